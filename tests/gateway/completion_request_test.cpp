#include "gateway/completion_request.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <string>
#include <utility>
#include <vector>

using tollgate::gateway::ApiError;
using tollgate::gateway::parse_completion_request;
using tollgate::gateway::ParsedCompletion;

namespace {

ParsedCompletion parse_ok(const std::string& body, bool chat = true) {
  auto r = parse_completion_request(body, chat);
  if (auto* e = std::get_if<ApiError>(&r)) FAIL("unexpected error for " << body << ": " << e->body());
  return std::get<ParsedCompletion>(r);
}

ApiError parse_error(const std::string& body, bool chat = true) {
  auto r = parse_completion_request(body, chat);
  if (!std::holds_alternative<ApiError>(r)) FAIL("expected an error for " << body);
  return std::get<ApiError>(r);
}

// A chat body with `extra` fields after one user message.
std::string chat(const std::string& extra = "") {
  return R"({"model":"m","messages":[{"role":"user","content":"hi"}])" + (extra.empty() ? "" : "," + extra) + "}";
}

// Checks a 400 invalid_request_error naming `param` (nullopt: none).
void check_bad(const std::string& body, const std::optional<std::string>& param, bool is_chat = true) {
  INFO(body);
  auto e = parse_error(body, is_chat);
  CHECK(e.status == 400);
  CHECK(e.type == "invalid_request_error");
  CHECK(e.param == param);
  CHECK(!e.message.empty());
  CHECK(e.code.has_value());
}

}  // namespace

TEST_CASE("a minimal chat request", "[gateway][request]") {
  auto p = parse_ok(chat());
  const auto& r = p.request;
  CHECK(r.chat());
  CHECK(r.model == "m");
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].role == "user");
  CHECK(r.messages[0].content == "hi");
  CHECK_FALSE(r.max_tokens);
  CHECK(r.temperature == 1.0);
  CHECK(r.top_p == 1.0);
  CHECK(r.presence_penalty == 0.0);
  CHECK(r.frequency_penalty == 0.0);
  CHECK_FALSE(r.seed);
  CHECK(r.stop.empty());
  CHECK_FALSE(r.stream);
  CHECK_FALSE(p.include_usage);
}

TEST_CASE("a chat request with every supported field", "[gateway][request]") {
  auto p = parse_ok(R"({"model":"llama","messages":[
      {"role":"system","content":"be brief"},
      {"role":"developer","content":"dev"},
      {"role":"user","content":[{"type":"text","text":"part one "},{"type":"text","text":"part two"}]},
      {"role":"assistant","content":null},
      {"role":"tool","content":"42"}],
    "max_tokens":16,"temperature":0.5,"top_p":0.9,"presence_penalty":-1.5,"frequency_penalty":2,
    "seed":7,"stop":["\n","END"],"stream":true,"stream_options":{"include_usage":true},
    "n":1,"user":"ignored","logit_bias":null,"tools":[]})");
  const auto& r = p.request;
  CHECK(r.model == "llama");
  REQUIRE(r.messages.size() == 5);
  CHECK(r.messages[0].role == "system");
  CHECK(r.messages[1].role == "developer");
  CHECK(r.messages[2].content == "part one part two");
  CHECK(r.messages[3].role == "assistant");
  CHECK(r.messages[3].content.empty());
  CHECK(r.messages[4].role == "tool");
  CHECK(r.max_tokens == 16);
  CHECK(r.temperature == 0.5);
  CHECK(r.top_p == 0.9);
  CHECK(r.presence_penalty == -1.5);
  CHECK(r.frequency_penalty == 2.0);
  CHECK(r.seed == 7u);
  CHECK(r.stop == std::vector<std::string>{"\n", "END"});
  CHECK(r.stream);
  CHECK(p.include_usage);
}

TEST_CASE("a completions request", "[gateway][request]") {
  auto p = parse_ok(R"({"model":"m","prompt":"once upon","max_tokens":3,"stop":"."})", false);
  CHECK_FALSE(p.request.chat());
  CHECK(p.request.prompt == "once upon");
  CHECK(p.request.messages.empty());
  CHECK(p.request.max_tokens == 3);
  CHECK(p.request.stop == std::vector<std::string>{"."});
  CHECK(parse_ok(R"({"model":"m","prompt":["only one"]})", false).request.prompt == "only one");
  CHECK(parse_ok(R"({"model":"m","prompt":""})", false).request.prompt.empty());
}

TEST_CASE("limits and nulls that are accepted", "[gateway][request]") {
  CHECK(parse_ok(chat(R"("temperature":0)")).request.temperature == 0.0);
  CHECK(parse_ok(chat(R"("temperature":2)")).request.temperature == 2.0);
  CHECK(parse_ok(chat(R"("temperature":null)")).request.temperature == 1.0);
  CHECK(parse_ok(chat(R"("top_p":0)")).request.top_p == 0.0);
  CHECK(parse_ok(chat(R"("max_tokens":1)")).request.max_tokens == 1);
  CHECK(parse_ok(chat(R"("max_tokens":1000000)")).request.max_tokens == 1000000);
  CHECK(parse_ok(chat(R"("max_tokens":5.0)")).request.max_tokens == 5);
  CHECK_FALSE(parse_ok(chat(R"("max_tokens":null)")).request.max_tokens);
  // The newer name wins over the deprecated one.
  CHECK(parse_ok(chat(R"("max_completion_tokens":4,"max_tokens":9)")).request.max_tokens == 4);
  CHECK(parse_ok(chat(R"("stop":null)")).request.stop.empty());
  CHECK(parse_ok(chat(R"("stop":["a","b","c","d"])")).request.stop.size() == 4);
  CHECK(parse_ok(chat(R"("n":null)")).request.model == "m");
  CHECK(parse_ok(chat(R"("n":1.0)")).request.model == "m");
  CHECK(parse_ok(chat(R"("stream":false,"stream_options":null)")).request.stream == false);
  CHECK(parse_ok(chat(R"("stream":true,"stream_options":{})")).include_usage == false);
  CHECK(parse_ok(chat(R"("seed":18446744073709551615)")).request.seed == 18446744073709551615u);
  CHECK(parse_ok(R"({"model":"m","messages":[{"role":"user","content":"snow \u2603 \ud83d\ude00"}]})")
            .request.messages[0]
            .content == "snow \xe2\x98\x83 \xf0\x9f\x98\x80");
}

TEST_CASE("the body must be one JSON object", "[gateway][request]") {
  check_bad("", std::nullopt);
  check_bad("not json", std::nullopt);
  check_bad("[]", std::nullopt);
  check_bad(R"("a string")", std::nullopt);
  check_bad("42", std::nullopt);
  check_bad("null", std::nullopt);
  check_bad(R"({"model":"m")", std::nullopt);            // truncated
  check_bad(chat() + " trailing", std::nullopt);         // trailing garbage
  check_bad(chat() + "{}", std::nullopt);                // a second document
  check_bad(std::string(R"({"model":"m","messages":[{"role":"user","content":"bad )") + "\xff\xfe" + R"("}]})",
            std::nullopt);  // invalid UTF-8
  check_bad(std::string(R"({"model":"m","messages":[{"role":"user","content":"cut )") + "\xe2\x98" + R"("}]})",
            std::nullopt);  // a truncated UTF-8 sequence
  check_bad(R"({"model":"m","messages":[{"role":"user","content":"lone \udc00"}]})", std::nullopt);
  CHECK(parse_error("[]").code == "invalid_json");
  CHECK(parse_error(chat() + " trailing").code == "invalid_json");
}

TEST_CASE("model is a required non-empty string", "[gateway][request]") {
  check_bad(R"({"messages":[{"role":"user","content":"hi"}]})", "model");
  CHECK(parse_error(R"({"messages":[{"role":"user","content":"hi"}]})").code == "missing_required_parameter");
  check_bad(R"({"model":5,"messages":[{"role":"user","content":"hi"}]})", "model");
  CHECK(parse_error(R"({"model":5,"messages":[{"role":"user","content":"hi"}]})").code == "invalid_type");
  check_bad(R"({"model":null,"messages":[{"role":"user","content":"hi"}]})", "model");
  check_bad(R"({"model":"","messages":[{"role":"user","content":"hi"}]})", "model");
  check_bad(R"({"model":"","prompt":"x"})", "model", false);
}

TEST_CASE("a model name longer than 256 bytes is refused without being echoed", "[gateway][request]") {
  const std::string longest(256, 'm');
  CHECK(parse_ok(R"({"model":")" + longest + R"(","prompt":"x"})", false).request.model == longest);
  for (std::size_t size : {257, 1'000'000}) {
    const std::string body =
        R"({"model":")" + std::string(size, 'm') + R"(","messages":[{"role":"user","content":"hi"}]})";
    check_bad(body, "model");
    auto e = parse_error(body);
    CHECK(e.code == "string_above_max_length");
    CHECK(e.body().size() < 300);
    auto embeddings =
        tollgate::gateway::parse_embeddings_request(R"({"model":")" + std::string(size, 'm') + R"(","input":"x"})");
    REQUIRE(std::holds_alternative<ApiError>(embeddings));
    CHECK(std::get<ApiError>(embeddings).code == "string_above_max_length");
  }
}

TEST_CASE("messages are validated one by one", "[gateway][request]") {
  check_bad(R"({"model":"m"})", "messages");
  check_bad(R"({"model":"m","prompt":"x"})", "messages");  // the chat route wants messages
  check_bad(R"({"model":"m","messages":"hi"})", "messages");
  check_bad(R"({"model":"m","messages":{}})", "messages");
  check_bad(R"({"model":"m","messages":[]})", "messages");
  check_bad(R"({"model":"m","messages":["hi"]})", "messages[0]");
  check_bad(R"({"model":"m","messages":[{"role":"user","content":"a"},null]})", "messages[1]");
  check_bad(R"({"model":"m","messages":[{"content":"hi"}]})", "messages[0].role");
  check_bad(R"({"model":"m","messages":[{"role":1,"content":"hi"}]})", "messages[0].role");
  check_bad(R"({"model":"m","messages":[{"role":"wizard","content":"hi"}]})", "messages[0].role");
  check_bad(R"({"model":"m","messages":[{"role":"User","content":"hi"}]})", "messages[0].role");
  check_bad(R"({"model":"m","messages":[{"role":"user"}]})", "messages[0].content");
  check_bad(R"({"model":"m","messages":[{"role":"user","content":null}]})", "messages[0].content");
  check_bad(R"({"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":7}]})",
            "messages[1].content");
  check_bad(R"({"model":"m","messages":[{"role":"user","content":{"text":"hi"}}]})", "messages[0].content");
}

TEST_CASE("an unknown role is echoed only when short", "[gateway][request]") {
  CHECK(parse_error(R"({"model":"m","messages":[{"role":"wizard","content":"hi"}]})").message ==
        "unknown role 'wizard'");
  // Found by tests/fuzz/completion_request_fuzz: a 4 MiB role came back whole in the 400.
  auto e = parse_error(R"({"model":"m","messages":[{"role":")" + std::string(100'000, 'x') + R"(","content":"hi"}]})");
  CHECK(e.message == "unknown role");
  CHECK(e.body().size() < 256);
}

TEST_CASE("content parts: text makes the content, other parts flag the request", "[gateway][request]") {
  const std::string head = R"({"model":"m","messages":[{"role":"user","content":)";
  auto image = parse_ok(head + R"([{"type":"text","text":"what is "},{"type":"image_url","image_url":{"url":"http://x"}},)"
                               R"({"type":"text","text":"this?"}]}]})");
  CHECK(image.request.messages[0].content == "what is this?");
  CHECK(image.request.non_text_content);
  CHECK_FALSE(parse_ok(head + R"([{"type":"text","text":"hi"}]}]})").request.non_text_content);
  // The body itself is kept for remote backends to forward.
  const std::string body = chat(R"("tools":[{"type":"function","function":{"name":"f"}}])");
  CHECK(parse_ok(body).request.body == body);
  check_bad(head + R"([{"text":"no type"}]}]})", "messages[0].content");
  check_bad(head + R"([{"type":5,"text":"x"}]}]})", "messages[0].content");
  check_bad(head + R"(["bare string"]}]})", "messages[0].content");
  check_bad(head + R"([{"type":"text"}]}]})", "messages[0].content");
  check_bad(head + R"([{"type":"text","text":3}]}]})", "messages[0].content");
  CHECK(parse_ok(head + R"([]}]})").request.messages[0].content.empty());
}

TEST_CASE("prompt for the completions route", "[gateway][request]") {
  check_bad(R"({"model":"m"})", "prompt", false);
  check_bad(R"({"model":"m","messages":[{"role":"user","content":"hi"}]})", "prompt", false);
  check_bad(R"({"model":"m","prompt":5})", "prompt", false);
  check_bad(R"({"model":"m","prompt":null})", "prompt", false);
  check_bad(R"({"model":"m","prompt":["a","b"]})", "prompt", false);
  check_bad(R"({"model":"m","prompt":[1,2,3]})", "prompt", false);
  check_bad(R"({"model":"m","prompt":[]})", "prompt", false);
}

TEST_CASE("sampling parameters: types and ranges", "[gateway][request]") {
  check_bad(chat(R"("temperature":2.5)"), "temperature");
  check_bad(chat(R"("temperature":-0.1)"), "temperature");
  check_bad(chat(R"("temperature":"hot")"), "temperature");
  CHECK(parse_error(chat(R"("temperature":"hot")")).code == "invalid_type");
  check_bad(chat(R"("temperature":true)"), "temperature");
  CHECK(parse_error(chat(R"("temperature":1e400)")).status == 400);  // out of double range
  check_bad(chat(R"("top_p":1.5)"), "top_p");
  check_bad(chat(R"("top_p":-1)"), "top_p");
  check_bad(chat(R"("presence_penalty":3)"), "presence_penalty");
  check_bad(chat(R"("frequency_penalty":-2.5)"), "frequency_penalty");
  check_bad(chat(R"("frequency_penalty":[])"), "frequency_penalty");
  check_bad(chat(R"("seed":"abc")"), "seed");
  check_bad(chat(R"("seed":1.5)"), "seed");
  check_bad(chat(R"("stream":"yes")"), "stream");
  check_bad(chat(R"("stream":1)"), "stream");
}

TEST_CASE("max_tokens must be a positive integer within the cap", "[gateway][request]") {
  check_bad(chat(R"("max_tokens":0)"), "max_tokens");
  check_bad(chat(R"("max_tokens":-3)"), "max_tokens");
  check_bad(chat(R"("max_tokens":1000001)"), "max_tokens");
  check_bad(chat(R"("max_tokens":18446744073709551615)"), "max_tokens");
  check_bad(chat(R"("max_tokens":1e30)"), "max_tokens");
  check_bad(chat(R"("max_tokens":1.5)"), "max_tokens");
  check_bad(chat(R"("max_tokens":"10")"), "max_tokens");
  check_bad(chat(R"("max_completion_tokens":0)"), "max_completion_tokens");
  check_bad(chat(R"("max_completion_tokens":false)"), "max_completion_tokens");
}

TEST_CASE("n must be 1", "[gateway][request]") {
  check_bad(chat(R"("n":2)"), "n");
  CHECK(parse_error(chat(R"("n":2)")).code == "unsupported_value");
  check_bad(chat(R"("n":0)"), "n");
  check_bad(chat(R"("n":1.5)"), "n");
  check_bad(chat(R"("n":"1")"), "n");
  CHECK(parse_error(chat(R"("n":"1")")).code == "invalid_type");
}

TEST_CASE("stop: a string or up to four non-empty strings", "[gateway][request]") {
  check_bad(chat(R"("stop":["a","b","c","d","e"])"), "stop");
  check_bad(chat(R"("stop":"")"), "stop");
  check_bad(chat(R"("stop":["a",""])"), "stop");
  check_bad(chat(R"("stop":5)"), "stop");
  check_bad(chat(R"("stop":["a",5])"), "stop");
  check_bad(chat(R"("stop":{"a":1})"), "stop");
}

TEST_CASE("stream_options needs stream", "[gateway][request]") {
  check_bad(chat(R"("stream_options":{"include_usage":true})"), "stream_options");
  check_bad(chat(R"("stream":false,"stream_options":{"include_usage":true})"), "stream_options");
  check_bad(chat(R"("stream":true,"stream_options":true)"), "stream_options");
  check_bad(chat(R"("stream":true,"stream_options":{"include_usage":"yes"})"), "stream_options.include_usage");
  check_bad(R"({"model":"m","prompt":"p","stream_options":{"include_usage":true}})", "stream_options", false);
  CHECK(parse_ok(R"({"model":"m","prompt":"p","stream":true,"stream_options":{"include_usage":true}})", false)
            .include_usage);
}

TEST_CASE("range errors state the bounds in plain numbers", "[gateway][request]") {
  CHECK(parse_error(chat(R"("temperature":5)")).message == "'temperature' must be between 0 and 2");
  CHECK(parse_error(chat(R"("top_p":2)")).message == "'top_p' must be between 0 and 1");
  CHECK(parse_error(chat(R"("presence_penalty":-3)")).message == "'presence_penalty' must be between -2 and 2");
}

TEST_CASE("every error body is OpenAI's shape", "[gateway][request]") {
  auto e = parse_error(chat(R"("temperature":9)"));
  CHECK(e.body().find(R"("error":{)") != std::string::npos);
  CHECK(e.body().find(R"("param":"temperature")") != std::string::npos);
  CHECK(e.body().find(R"("type":"invalid_request_error")") != std::string::npos);
  auto no_param = parse_error("[]");
  CHECK(no_param.body().find(R"("param":null)") != std::string::npos);
}

TEST_CASE("logprobs: chat's flag and top_logprobs, the legacy count", "[gateway][request]") {
  CHECK_FALSE(parse_ok(chat()).request.logprobs);
  CHECK_FALSE(parse_ok(chat(R"("logprobs":false)")).request.logprobs);
  CHECK(parse_ok(chat(R"("logprobs":true)")).request.logprobs == 0);
  CHECK(parse_ok(chat(R"("logprobs":true,"top_logprobs":5)")).request.logprobs == 5);
  CHECK(parse_ok(chat(R"("logprobs":true,"top_logprobs":20.0)")).request.logprobs == 20);
  check_bad(chat(R"("top_logprobs":2)"), "top_logprobs");
  check_bad(chat(R"("logprobs":false,"top_logprobs":2)"), "top_logprobs");
  check_bad(chat(R"("logprobs":true,"top_logprobs":21)"), "top_logprobs");
  check_bad(chat(R"("logprobs":true,"top_logprobs":-1)"), "top_logprobs");
  check_bad(chat(R"("logprobs":true,"top_logprobs":1.5)"), "top_logprobs");
  check_bad(chat(R"("logprobs":3)"), "logprobs");

  const std::string prompt = R"({"model":"m","prompt":"hi")";
  CHECK_FALSE(parse_ok(prompt + "}", false).request.logprobs);
  CHECK(parse_ok(prompt + R"(,"logprobs":0})", false).request.logprobs == 0);
  CHECK(parse_ok(prompt + R"(,"logprobs":3})", false).request.logprobs == 3);
  CHECK_FALSE(parse_ok(prompt + R"(,"logprobs":null})", false).request.logprobs);
  check_bad(prompt + R"(,"logprobs":true})", "logprobs", false);
  check_bad(prompt + R"(,"logprobs":21})", "logprobs", false);
  check_bad(prompt + R"(,"logprobs":18446744073709551615})", "logprobs", false);
}

TEST_CASE("embeddings: model and input are checked, the body is kept whole", "[gateway][request]") {
  using tollgate::gateway::parse_embeddings_request;
  auto ok = [](const std::string& body) {
    auto r = parse_embeddings_request(body);
    if (auto* e = std::get_if<ApiError>(&r)) FAIL("unexpected error for " << body << ": " << e->body());
    return std::get<ParsedCompletion>(r).request;
  };
  auto bad = [](const std::string& body, const std::optional<std::string>& param) {
    INFO(body);
    auto r = parse_embeddings_request(body);
    REQUIRE(std::holds_alternative<ApiError>(r));
    CHECK(std::get<ApiError>(r).status == 400);
    CHECK(std::get<ApiError>(r).param == param);
  };
  auto one = ok(R"({"model":"e","input":"hello there","dimensions":256})");
  CHECK(one.embeddings());
  CHECK(one.model == "e");
  CHECK(one.prompt == "hello there");
  CHECK(one.body == R"({"model":"e","input":"hello there","dimensions":256})");
  CHECK(ok(R"({"model":"e","input":["a","bc"]})").prompt == "a\nbc\n");
  CHECK(ok(R"({"model":"e","input":[[1,2,3],[4]]})").prompt.size() == 16);  // ~4 bytes a token
  CHECK(ok(R"({"model":"e","input":[1,2]})").prompt.size() == 8);
  bad(R"({"input":"x"})", "model");
  bad(R"({"model":"e"})", "input");
  bad(R"({"model":"e","input":null})", "input");
  bad(R"({"model":"e","input":[]})", "input");
  bad(R"({"model":"e","input":5})", "input");
  bad(R"({"model":"e","input":[["x"]]})", "input");
  bad(R"({"model":"e","input":[{"a":1}]})", "input");
  bad("not json", std::nullopt);
}

TEST_CASE("logit_bias: token ids to -100..100, checked as OpenAI does", "[gateway][request]") {
  auto p = parse_ok(chat(R"("logit_bias":{"5":100,"0":-100,"42":0.5})"));
  auto bias = p.request.logit_bias;
  std::sort(bias.begin(), bias.end());
  CHECK(bias == std::vector<std::pair<std::int32_t, float>>{{0, -100.0f}, {5, 100.0f}, {42, 0.5f}});
  CHECK(parse_ok(chat(R"("logit_bias":{})")).request.logit_bias.empty());
  check_bad(chat(R"("logit_bias":[1,2])"), "logit_bias");
  check_bad(chat(R"("logit_bias":{"abc":1})"), "logit_bias");
  check_bad(chat(R"("logit_bias":{"-1":1})"), "logit_bias");
  check_bad(chat(R"("logit_bias":{"5":500})"), "logit_bias");
  check_bad(chat(R"("logit_bias":{"5":"1"})"), "logit_bias");
  check_bad(chat(R"("logit_bias":{"99999999999":1})"), "logit_bias");
  CHECK(parse_error(chat(R"("logit_bias":{"abc":1})")).message.find("'abc'") != std::string::npos);
}

TEST_CASE("tools, tool_choice, response_format, echo and suffix: shapes checked, what is asked recorded",
          "[gateway][request]") {
  const std::string tool = R"("tools":[{"type":"function","function":{"name":"f","parameters":{}}}])";
  CHECK(parse_ok(chat(tool)).request.tools);
  CHECK(parse_ok(chat(tool + R"(,"tool_choice":"required")")).request.tools);
  CHECK(parse_ok(chat(tool + R"(,"tool_choice":{"type":"function","function":{"name":"f"}})")).request.tools);
  CHECK_FALSE(parse_ok(chat(tool + R"(,"tool_choice":"none")")).request.tools);
  CHECK_FALSE(parse_ok(chat(R"("tools":[],"tool_choice":"none")")).request.tools);
  check_bad(chat(R"("tool_choice":"required")"), "tool_choice");
  check_bad(chat(R"("tools":[],"tool_choice":"auto")"), "tool_choice");
  check_bad(chat(tool + R"(,"tool_choice":"always")"), "tool_choice");
  check_bad(chat(R"("tools":{"f":1})"), "tools");

  CHECK(parse_ok(chat(R"("response_format":{"type":"text"})")).request.response_format.empty());
  CHECK(parse_ok(chat(R"("response_format":{"type":"json_object"})")).request.response_format == "json_object");
  CHECK(parse_ok(chat(R"("response_format":{"type":"json_schema","json_schema":{"name":"x"}})"))
            .request.response_format == "json_schema");
  check_bad(chat(R"("response_format":"json")"), "response_format");
  check_bad(chat(R"("response_format":{"type":"yaml"})"), "response_format.type");

  CHECK(parse_ok(R"({"model":"m","prompt":"p","echo":true,"suffix":"end"})", false).request.echo);
  CHECK(parse_ok(R"({"model":"m","prompt":"p","echo":true,"suffix":"end"})", false).request.suffix);
  CHECK_FALSE(parse_ok(R"({"model":"m","prompt":"p","echo":false,"suffix":""})", false).request.suffix);
  check_bad(R"({"model":"m","prompt":"p","echo":"yes"})", "echo", false);
  check_bad(R"({"model":"m","prompt":"p","suffix":3})", "suffix", false);
}
