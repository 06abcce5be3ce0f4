// The OpenAI-compatible routes through the real binary.
#include <catch2/catch.hpp>
#include <regex>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;
namespace json = boost::json;

TEST_CASE("chat completion, non-streaming, answers in OpenAI's shape with usage", "[e2e][completions]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  auto r = client.post("/v1/chat/completions", key, chat_body("echo", "hello gateway world"));
  REQUIRE(r.status == 200);
  auto body = r.json().as_object();
  CHECK(body.at("object") == "chat.completion");
  CHECK(body.at("model") == "echo");
  auto& choice = body.at("choices").as_array().at(0).as_object();
  CHECK(choice.at("message").at("role") == "assistant");
  CHECK(choice.at("message").at("content") == "hello gateway world");
  CHECK(choice.at("finish_reason") == "stop");
  CHECK(body.at("usage").at("prompt_tokens") == 3);
  CHECK(body.at("usage").at("completion_tokens") == 3);
  CHECK(body.at("usage").at("total_tokens") == 6);
  // Every answer is dated (RFC 9110: an origin server with a clock sends Date).
  const std::regex imf_fixdate(R"([A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT)");
  CHECK(std::regex_match(r.header("date"), imf_fixdate));
  CHECK(std::regex_match(client.get("/healthz").header("date"), imf_fixdate));
  auto streamed = client.post("/v1/chat/completions", key, chat_body("echo", "hi", R"("stream":true)"));
  CHECK(std::regex_match(streamed.header("date"), imf_fixdate));
}

TEST_CASE("streamed completion sends SSE chunks, usage when asked, and [DONE]", "[e2e][completions]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  auto r = client.post("/v1/completions", key,
                       R"({"model":"echo","prompt":"one two three four","max_tokens":3,"stream":true,)"
                       R"("stream_options":{"include_usage":true}})");
  REQUIRE(r.status == 200);
  CHECK(r.header("content-type") == "text/event-stream");
  std::vector<json::value> events;
  std::size_t pos = 0;
  bool done = false;
  while ((pos = r.body.find("data: ", pos)) != std::string::npos) {
    auto end = r.body.find("\n\n", pos);
    auto data = r.body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") {
      done = true;
      continue;
    }
    events.push_back(json::parse(data));
  }
  CHECK(done);
  REQUIRE(events.size() == 5);  // three tokens, the finish, the usage
  std::string text;
  for (int i = 0; i < 3; ++i) text += events[i].at("choices").at(0).at("text").as_string();
  CHECK(text == "one two three");
  CHECK(events[3].at("choices").at(0).at("finish_reason") == "length");
  CHECK(events[4].at("choices").as_array().empty());
  CHECK(events[4].at("usage").at("completion_tokens") == 3);
  CHECK(events[4].at("usage").at("prompt_tokens") == 4);
}

// HTTP/1.0 has no chunked coding (RFC 9112 6.1): a stream to a 1.0 client
// (nginx's default toward upstreams) is a body the closing connection ends.
TEST_CASE("a streamed answer to an HTTP/1.0 client is not chunked and ends with the connection", "[e2e][completions]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  for (std::string connection : {"", "Connection: keep-alive\r\n"}) {
    INFO("connection header: " << connection);
    HttpClient client(gw.port());
    const std::string body = R"({"model":"echo","prompt":"one two three","stream":true})";
    REQUIRE(client.send_raw("POST /v1/completions HTTP/1.0\r\nAuthorization: Bearer " + key + "\r\n" + connection +
                            "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                            "\r\n\r\n" + body));
    std::string raw;
    for (int i = 0; i < 50 && raw.find("[DONE]\n\n") == std::string::npos; ++i) raw += client.read_some(100ms);
    INFO(raw);
    CHECK(client.wait_closed(2s));
    REQUIRE(raw.starts_with("HTTP/1.0 200 OK\r\n"));
    const auto head_end = raw.find("\r\n\r\n");
    REQUIRE(head_end != std::string::npos);
    std::string head = raw.substr(0, head_end);
    for (char& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    CHECK(head.find("transfer-encoding") == std::string::npos);
    CHECK(head.find("content-length") == std::string::npos);
    CHECK(head.find("keep-alive") == std::string::npos);
    const std::string sse = raw.substr(head_end + 4);
    CHECK(sse.starts_with("data: {"));
    CHECK(sse.ends_with("data: [DONE]\n\n"));
    CHECK(sse.find("\"text\":\"one\"") != std::string::npos);
  }
}

TEST_CASE("a client that hangs up before a non-streamed answer cancels the work at once", "[e2e][completions]") {
  TempDir dir;
  GatewayProcess::Options options;
  options.config_yaml = R"(
metering: {flush_interval: 100ms}
backends: [{name: echo, type: echo, token_delay: 20ms}]
models: [{name: echo, deployments: [{backend: echo}]}]
)";
  GatewayProcess gw(dir, options);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  std::string words;
  for (int i = 0; i < 300; ++i) words += "word ";  // 300 tokens at 20 ms: a 6 s answer
  auto body = R"({"model":"echo","prompt":")" + words + R"("})";
  auto sent = std::chrono::steady_clock::now();
  {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw(raw_post("/v1/completions", key, body)));
    std::this_thread::sleep_for(300ms);
  }  // hangs up without reading
  std::int64_t rows = 0;
  for (int i = 0; i < 100 && rows == 0; ++i) {
    std::this_thread::sleep_for(50ms);
    rows = count_usage_rows(gw.db(), "route = '/v1/completions' AND status = 499");
  }
  CHECK(rows == 1);
  CHECK(std::chrono::steady_clock::now() - sent < 4s);  // long before the answer would have been done
  // A keep-alive client that pipelines its next request is not mistaken for one that left.
  HttpClient client(gw.port());
  std::string small = R"({"model":"echo","prompt":"a b c"})";
  std::string one = raw_post("/v1/completions", key, small);
  REQUIRE(client.send_raw(one + one));
  auto first = client.read_response();
  auto second = client.read_response();
  REQUIRE(first);
  REQUIRE(second);
  CHECK(first->status == 200);
  CHECK(second->status == 200);
}
