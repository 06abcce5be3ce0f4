#include "backends/openai_compatible.hpp"

#include <catch2/catch.hpp>

#include <boost/json.hpp>

#include "backends/http_client.hpp"

using namespace tollgate::backends;
namespace json = boost::json;

TEST_CASE("SSE decoder joins events split across reads and skips comments", "[backends][openai]") {
  SseDecoder sse;
  std::string stream = ": ping\n\ndata: {\"a\":1}\n\ndata: first\r\ndata: second\r\n\r\nevent: x\ndata: [DONE]\n\n";
  std::vector<std::string> events;
  // Every split point, byte by byte: the decoder may not depend on read sizes.
  for (char c : stream) {
    for (auto& e : sse.feed(std::string_view(&c, 1))) events.push_back(e);
  }
  REQUIRE(events.size() == 3);
  CHECK(events[0] == "{\"a\":1}");
  CHECK(events[1] == "first\nsecond");
  CHECK(events[2] == "[DONE]");
  CHECK(sse.feed("data: unterminated\n").empty());
}

TEST_CASE("upstream body maps the model, keeps set parameters, asks for streamed usage", "[backends][openai]") {
  CompletionRequest r;
  r.endpoint = Endpoint::chat_completions;
  r.model = "llama";
  r.upstream_model = "llama-3.1-8b-instant";
  r.messages = {{"system", "be brief"}, {"user", "hi"}};
  r.max_tokens = 7;
  r.temperature = 0.5;
  r.seed = 42;
  r.stop = {"\n"};
  r.stream = true;
  r.user = "alice";
  auto body = json::parse(upstream_request_body(r)).as_object();
  CHECK(body.at("model") == "llama-3.1-8b-instant");
  CHECK(body.at("messages").as_array().size() == 2);
  CHECK(body.at("messages").at(1).at("content") == "hi");
  CHECK(body.at("max_tokens") == 7);
  CHECK(body.at("temperature") == 0.5);
  CHECK(body.at("seed") == 42);
  CHECK(body.at("stop").at(0) == "\n");
  CHECK(body.at("stream_options").at("include_usage") == true);
  CHECK_FALSE(body.contains("top_p"));  // defaults are left to the upstream
  CHECK_FALSE(body.contains("user"));   // the Tollgate user stays here

  r.stream = false;
  r.endpoint = Endpoint::completions;
  r.prompt = "once upon";
  body = json::parse(upstream_request_body(r)).as_object();
  CHECK(body.at("prompt") == "once upon");
  CHECK_FALSE(body.contains("stream_options"));
  CHECK_FALSE(body.contains("messages"));
}

TEST_CASE("a client's body is forwarded whole, with the deployment's model and usage asked for",
          "[backends][openai]") {
  CompletionRequest r;
  r.endpoint = Endpoint::chat_completions;
  r.model = "public";
  r.upstream_model = "llama-3.1-8b-instant";
  r.stream = true;
  r.body = R"({"model":"public","stream":true,"stream_options":{"include_usage":false},)"
           R"("messages":[{"role":"user","content":[{"type":"text","text":"what?"},)"
           R"({"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},)"
           R"({"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",)"
           R"("function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],)"
           R"("tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],)"
           R"("tool_choice":"auto","response_format":{"type":"json_object"},"top_k":5})";
  auto body = json::parse(upstream_request_body(r)).as_object();
  CHECK(body.at("model") == "llama-3.1-8b-instant");
  CHECK(body.at("stream_options").at("include_usage") == true);
  CHECK(body.at("tools").at(0).at("function").at("name") == "f");
  CHECK(body.at("tool_choice") == "auto");
  CHECK(body.at("response_format").at("type") == "json_object");
  CHECK(body.at("top_k") == 5);
  const auto& messages = body.at("messages").as_array();
  CHECK(messages.at(0).at("content").at(1).at("image_url").at("url") == "data:image/png;base64,AAAA");
  CHECK(messages.at(1).at("tool_calls").at(0).at("id") == "c1");
  CHECK(messages.at(2).at("tool_call_id") == "c1");

  r.stream = false;
  r.body = R"({"model":"public","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":9})";
  body = json::parse(upstream_request_body(r)).as_object();
  CHECK_FALSE(body.contains("stream_options"));
  CHECK(body.at("max_completion_tokens") == 9);
}

TEST_CASE("base URLs: scheme, host, port and path", "[backends][openai]") {
  std::string error;
  auto groq = parse_base_url("https://api.groq.com/openai/v1/", error);
  REQUIRE(groq);
  CHECK(groq->tls);
  CHECK(groq->host == "api.groq.com");
  CHECK(groq->port == "443");
  CHECK(groq->base_path == "/openai/v1");
  CHECK(groq->host_header() == "api.groq.com");
  auto local = parse_base_url("http://127.0.0.1:8000/v1", error);
  REQUIRE(local);
  CHECK_FALSE(local->tls);
  CHECK(local->host_header() == "127.0.0.1:8000");
  CHECK_FALSE(parse_base_url("ftp://example.com/v1", error));
  CHECK_FALSE(parse_base_url("not a url", error));
  CHECK_FALSE(parse_base_url("https://user:pw@example.com/v1", error));
}

TEST_CASE("SSE decoder stops at a line or an event past its cap", "[backends][openai]") {
  SseDecoder sse(64, 100);
  auto events = sse.feed("data: small\n\ndata: " + std::string(40, 'a'));
  REQUIRE(events.size() == 1);
  CHECK(events[0] == "small");
  CHECK_FALSE(sse.overflowed());
  // The line never ends: past 64 bytes the decoder gives up, whatever follows.
  CHECK(sse.feed(std::string(30, 'a')).empty());
  CHECK(sse.overflowed());
  CHECK(sse.feed("\n\ndata: later\n\n").empty());

  // Short lines, but one event that never ends.
  SseDecoder event(64, 100);
  for (int i = 0; i < 10; ++i) CHECK(event.feed("data: " + std::string(20, 'b') + "\n").empty());
  CHECK(event.overflowed());

  // At the caps exactly, all is well.
  SseDecoder exact(64, 100);
  events = exact.feed("data: " + std::string(58, 'c') + "\ndata: " + std::string(41, 'd') + "\n\n");
  CHECK_FALSE(exact.overflowed());
  REQUIRE(events.size() == 1);
  CHECK(events[0].size() == 100);
}

TEST_CASE("secret scrubber: the key and header values, raw, JSON-escaped, in URLs, cut short and as bearer tokens",
          "[backends][openai]") {
  const std::string key = "sk-canary/0123456789+abcdef\"xyz";
  SecretScrubber scrub(key, {{"X-Org-Token", "org-canary-token-42"}, {"X-Flag", "1"}});
  CHECK(scrub("quota exceeded for " + key + ".") == "quota exceeded for ***.");
  CHECK(scrub("org org-canary-token-42 and org-canary-token-42") == "org *** and ***");
  // Values too short to be credentials stay.
  CHECK(scrub("version 1") == "version 1");
  // As the key reads inside a JSON string, with and without '/' escaped.
  CHECK(scrub(R"({"message":"sk-canary/0123456789+abcdef\"xyz"})") == R"({"message":"***"})");
  CHECK(scrub(R"({"message":"sk-canary\/0123456789+abcdef\"xyz"})") == R"({"message":"***"})");
  // In a URL's query.
  CHECK(scrub("GET /v1?key=sk-canary%2F0123456789%2Babcdef%22xyz") == "GET /v1?key=***");
  // A truncated echo: the first 12 bytes or more of the key.
  CHECK(scrub("key sk-canary/0123... is invalid") == "key ***... is invalid");
  CHECK(scrub("key sk-canary/01 is invalid") == "key *** is invalid");
  CHECK(scrub("key sk-canary/0 is fine") == "key sk-canary/0 is fine");
  // Any bearer token, even one we do not know, in any case.
  CHECK(scrub("Authorization: Bearer tok_ABC.def-123= was refused") == "Authorization: Bearer *** was refused");
  CHECK(scrub("bearer  x1 and BEARER y2") == "bearer  *** and BEARER ***");
  CHECK(scrub("nothing to see") == "nothing to see");
  // A secret that is part of the mask cannot make it loop.
  SecretScrubber star("*", {});
  CHECK(star("a*b") == "a***b");
  // No secrets configured: only bearer tokens go.
  CHECK(SecretScrubber()("Bearer abc") == "Bearer ***");
}
