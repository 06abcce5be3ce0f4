// The `openai` backend against a fake OpenAI-compatible upstream (plain and
// TLS) and against a second Tollgate: exact usage, error mapping,
// cancellation, and the provider key kept secret.
#include <catch2/catch.hpp>

#include <sys/socket.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "harness.hpp"
#include "local_engine/tokenizer.hpp"
#include "tests/local_engine/reference.hpp"
#include "upstream.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

const std::string kProviderKey = "sk-provider-secret-0123456789abcdef";

// One backend `up` on the fake; each public model maps to a behaviour.
std::string fake_config(std::uint16_t port, const std::string& extra_backends = "",
                        const std::string& extra_models = "") {
  std::string url = "http://127.0.0.1:" + std::to_string(port) + "/v1";
  std::string yaml = "backends:\n"
                     "  - name: up\n"
                     "    type: openai\n"
                     "    base_url: " + url + "\n"
                     "    api_key: ${PROVIDER_KEY}\n"
                     "    headers: {X-Extra: yes-please}\n"
                     "    timeouts: {connect: 5s, first_byte: 20s, idle: 20s, total: 60s}\n"
                     "    max_connections: 4\n"
                     "  - name: up-impatient\n"
                     "    type: openai\n"
                     "    base_url: " + url + "\n"
                     "    timeouts: {first_byte: 1s}\n" +
                     extra_backends + "models:\n";
  for (std::string m : {"normal", "groq", "nousage", "slow", "die", "flood", "429", "500", "400", "404", "tools",
                        "longline", "longline-first", "longchunk", "huge", "jsononly"}) {
    yaml += "  - {name: m-" + m + ", deployments: [{backend: up, model: '" + m + "'}]}\n";
  }
  yaml += "  - {name: m-hang, deployments: [{backend: up-impatient, model: hang}]}\n" + extra_models;
  return yaml;
}

GatewayProcess::Options with_config(std::string yaml) {
  GatewayProcess::Options o;
  o.config_yaml = std::move(yaml);
  o.env = {{"PROVIDER_KEY", kProviderKey}};
  return o;
}

std::string stream_body(const std::string& model, bool include_usage) {
  return R"({"model":")" + model + R"(","stream":true,"messages":[{"role":"user","content":"hi there"}])" +
         (include_usage ? R"(,"stream_options":{"include_usage":true}})" : "}");
}

// Starts a streamed chat on `client` and reads until `marker` arrives.
void start_stream(HttpClient& client, const std::string& key, const std::string& model, const std::string& marker) {
  REQUIRE(client.send_raw(raw_post("/v1/chat/completions", key, stream_body(model, false))));
  std::string got;
  for (int i = 0; i < 100 && got.find(marker) == std::string::npos; ++i) got += client.read_some(100ms);
  REQUIRE(got.find(marker) != std::string::npos);
}

// The streamed text and whether a usage chunk and [DONE] came.
struct Streamed {
  std::string text;
  std::optional<json::object> usage;
  bool done = false;
  bool error = false;
};

Streamed parse_stream(const std::string& body, bool chat = true) {
  Streamed s;
  for (const auto& data : sse_data(body)) {
    if (data == "[DONE]") {
      s.done = true;
      continue;
    }
    auto v = json::parse(data).as_object();
    if (v.contains("error")) {
      s.error = true;
      continue;
    }
    if (auto* u = v.if_contains("usage"); u && u->is_object()) s.usage = u->as_object();
    auto& choices = v.at("choices").as_array();
    if (choices.empty()) continue;
    auto& c = choices[0].as_object();
    if (chat) {
      if (auto* t = c.at("delta").as_object().if_contains("content")) s.text += t->as_string().c_str();
    } else {
      s.text += c.at("text").as_string().c_str();
    }
  }
  return s;
}

}  // namespace

TEST_CASE("openai backend: completions with the upstream's exact usage, mapped model and provider key",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto r = client.post("/v1/chat/completions", key, chat_body("m-normal", "hello upstream"));
  REQUIRE(r.status == 200);
  auto body = r.json().as_object();
  CHECK(body.at("model") == "m-normal");
  CHECK(body.at("choices").at(0).at("message").at("content") == "Hello from fake upstream");
  CHECK(body.at("usage").at("prompt_tokens") == 13);
  CHECK(body.at("usage").at("completion_tokens") == 5);
  CHECK(body.at("usage").at("prompt_tokens_details").at("cached_tokens") == 3);  // the provider's details, relayed
  CHECK(body.at("usage").at("completion_tokens_details").at("reasoning_tokens") == 2);
  auto last = fake.last().as_object();
  CHECK(last.at("path") == "/v1/chat/completions");
  CHECK(last.at("headers").at("authorization") == json::value("Bearer " + kProviderKey));
  CHECK(last.at("headers").at("x-extra") == "yes-please");
  CHECK(last.at("body").at("model") == "normal");
  CHECK(last.at("body").at("messages").at(0).at("content") == "hello upstream");

  // Streaming without include_usage: the gateway still asks the upstream for
  // usage, and strips it from what the client sees.
  r = client.post("/v1/chat/completions", key, stream_body("m-normal", false));
  REQUIRE(r.status == 200);
  auto s = parse_stream(r.body);
  CHECK(s.text == "Hello from fake upstream");
  CHECK(s.done);
  CHECK_FALSE(s.usage);
  last = fake.last().as_object();
  CHECK(last.at("body").at("stream") == true);
  CHECK(last.at("body").at("stream_options").at("include_usage") == true);

  // Text completions, streamed, with include_usage: the upstream's numbers.
  r = client.post("/v1/completions", key,
                  R"({"model":"m-normal","prompt":"say hi","stream":true,"stream_options":{"include_usage":true}})");
  REQUIRE(r.status == 200);
  s = parse_stream(r.body, false);
  CHECK(s.text == "Hello from fake upstream");
  REQUIRE(s.usage);
  CHECK(s.usage->at("prompt_tokens") == 13);
  CHECK(s.usage->at("completion_tokens") == 5);
  CHECK(fake.last().at("path") == "/v1/completions");

  CHECK(wait_usage_rows(gw.db(),
                        "backend='up' AND model='m-normal' AND status=200 AND prompt_tokens=13 AND "
                        "completion_tokens=5 AND estimated=0",
                        3) == 3);

  // An upstream that ignores "stream": true and answers whole JSON: the
  // client still gets a stream, with the text, the usage and [DONE].
  r = client.post("/v1/chat/completions", key, stream_body("m-jsononly", true));
  REQUIRE(r.status == 200);
  CHECK(r.header("content-type") == "text/event-stream");
  s = parse_stream(r.body);
  CHECK(s.text == "Hello from fake upstream");
  CHECK(s.done);
  REQUIRE(s.usage);
  CHECK(s.usage->at("completion_tokens") == 5);
  CHECK(fake.last().at("body").at("stream") == true);
}

TEST_CASE("openai backend: logprobs are asked for and relayed, chat and legacy, streamed and not",
          "[e2e][openai][logprobs]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  const std::vector<std::string> pieces = {"Hello", " from", " fake", " upstream"};

  // Chat, whole: the upstream was asked with OpenAI's names; every token arrives.
  auto r = client.post("/v1/chat/completions", key, chat_body("m-normal", "hi", R"("logprobs":true,"top_logprobs":2)"));
  REQUIRE(r.status == 200);
  auto asked = fake.last().at("body").as_object();
  CHECK(asked.at("logprobs") == true);
  CHECK(asked.at("top_logprobs") == 2);
  auto content = r.json().at("choices").at(0).at("logprobs").at("content").as_array();
  REQUIRE(content.size() == pieces.size());
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    INFO(i);
    CHECK(content[i].at("token") == json::value(pieces[i]));
    CHECK(content[i].at("logprob").to_number<double>() == Approx(-0.1 * double(i + 1)));
    json::array bytes;
    for (unsigned char c : pieces[i]) bytes.push_back(c);
    CHECK(content[i].at("bytes") == bytes);
    auto& top = content[i].at("top_logprobs").as_array();
    REQUIRE(top.size() == 2);
    CHECK(top[1].at("token") == "x");
  }

  // Chat, streamed: each chunk carries its token.
  r = client.post("/v1/chat/completions", key,
                  R"({"model":"m-normal","stream":true,"logprobs":true,"messages":[{"role":"user","content":"hi"}]})");
  REQUIRE(r.status == 200);
  CHECK(fake.last().at("body").as_object().if_contains("top_logprobs") == nullptr);
  std::vector<std::string> tokens;
  for (const auto& data : sse_data(r.body)) {
    if (data == "[DONE]") continue;
    auto event = json::parse(data);
    const auto& choice = event.at("choices").at(0).as_object();
    if (!choice.at("finish_reason").is_null()) {
      CHECK(choice.at("logprobs").is_null());
      continue;
    }
    for (const auto& t : choice.at("logprobs").at("content").as_array()) {
      tokens.emplace_back(t.at("token").as_string());
      CHECK(t.at("top_logprobs").as_array().empty());
    }
  }
  CHECK(tokens == pieces);

  // Legacy completions, whole: parallel arrays, the top maps keep the chosen token.
  r = client.post("/v1/completions", key, R"({"model":"m-normal","prompt":"hi","logprobs":1})");
  REQUIRE(r.status == 200);
  CHECK(fake.last().at("body").at("logprobs") == 1);
  auto lp = r.json().at("choices").at(0).at("logprobs").as_object();
  CHECK(lp.at("tokens") == json::array{"Hello", " from", " fake", " upstream"});
  CHECK(lp.at("token_logprobs").at(3).to_number<double>() == Approx(-0.4));
  CHECK(lp.at("top_logprobs").at(0).as_object().size() == 1);
  CHECK(lp.at("text_offset") == json::array{0, 5, 10, 15});

  // Not asked: not asked of the upstream either, and null.
  r = client.post("/v1/chat/completions", key, chat_body("m-normal", "hi"));
  REQUIRE(r.status == 200);
  CHECK(fake.last().at("body").as_object().if_contains("logprobs") == nullptr);
  CHECK(r.json().at("choices").at(0).at("logprobs").is_null());
}

TEST_CASE("openai backend: tools, images and response_format reach the upstream, and tool calls come back",
          "[e2e][openai][tools]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  const std::string request =
      R"({"model":"m-tools","messages":[{"role":"user","content":[{"type":"text","text":"Weather here?"},)"
      R"({"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]},)"
      R"({"role":"assistant","content":null,"tool_calls":[{"id":"c0","type":"function",)"
      R"("function":{"name":"get_weather","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c0","content":"?"}],)"
      R"("tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",)"
      R"("properties":{"city":{"type":"string"}}}}}],"tool_choice":"auto","response_format":{"type":"json_object"})";

  auto r = client.post("/v1/chat/completions", key, request + "}");
  REQUIRE(r.status == 200);
  auto sent = fake.last().at("body").as_object();
  CHECK(sent.at("model") == "tools");  // mapped, the rest as the client wrote it
  CHECK(sent.at("tools").at(0).at("function").at("name") == "get_weather");
  CHECK(sent.at("tool_choice") == "auto");
  CHECK(sent.at("response_format").at("type") == "json_object");
  CHECK(sent.at("messages").at(0).at("content").at(1).at("image_url").at("url") == "data:image/png;base64,iVBORw0KGgo=");
  CHECK(sent.at("messages").at(2).at("tool_call_id") == "c0");
  auto choice = r.json().at("choices").at(0).as_object();
  CHECK(choice.at("finish_reason") == "tool_calls");
  CHECK(choice.at("message").at("content").is_null());
  const auto& call = choice.at("message").at("tool_calls").at(0);
  CHECK(call.at("id") == "call_1");
  CHECK(call.at("function").at("name") == "get_weather");
  CHECK(call.at("function").at("arguments") == R"({"city": "Paris"})");

  // Streamed: the name first, then the arguments in pieces, each as it came.
  r = client.post("/v1/chat/completions", key, request + R"(,"stream":true})");
  REQUIRE(r.status == 200);
  std::string name, arguments, finish;
  int pieces = 0;
  for (const auto& data : sse_data(r.body)) {
    if (data == "[DONE]") continue;
    auto event = json::parse(data);
    const auto& c = event.at("choices").at(0).as_object();
    if (!c.at("finish_reason").is_null()) finish = c.at("finish_reason").as_string();
    const auto& delta = c.at("delta").as_object();
    if (const auto* calls = delta.if_contains("tool_calls")) {
      ++pieces;
      CHECK_FALSE(delta.contains("content"));
      const auto& f = calls->at(0).at("function").as_object();
      if (const auto* n = f.if_contains("name")) name += n->as_string();
      arguments += f.at("arguments").as_string();
    }
  }
  CHECK(pieces == 3);
  CHECK(name == "get_weather");
  CHECK(arguments == R"({"city": "Paris"})");
  CHECK(finish == "tool_calls");
  CHECK(wait_usage_rows(gw.db(), "model='m-tools' AND status=200 AND completion_tokens=5 AND estimated=0", 2) == 2);
}

TEST_CASE("openai backend: embeddings are forwarded, metered and counted against quotas", "[e2e][openai][embeddings]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port(), "  - {name: e, type: echo}\n",
                                                 "  - {name: echo-only, deployments: [{backend: e}]}\n")));
  auto key = create_key(gw.db(), "alice");
  auto limited = create_key(gw.db(), "bob", {"--rpd", "1"});
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto r = client.post("/v1/embeddings", key,
                       R"({"model":"m-normal","input":["first text","second"],"encoding_format":"float"})");
  REQUIRE(r.status == 200);
  auto body = r.json().as_object();
  CHECK(body.at("model") == "m-normal");  // the public name, not the upstream's
  REQUIRE(body.at("data").as_array().size() == 2);
  CHECK(body.at("data").at(1).at("embedding").at(2).to_number<double>() == 1.0);
  CHECK(body.at("usage").at("prompt_tokens") == 14);
  auto sent = fake.last().as_object();
  CHECK(sent.at("path") == "/v1/embeddings");
  CHECK(sent.at("body").at("model") == "normal");
  CHECK(sent.at("body").at("encoding_format") == "float");
  CHECK(sent.at("headers").at("authorization") == json::value("Bearer " + kProviderKey));

  // Bad input, unknown models and models without an embeddings backend.
  CHECK(client.post("/v1/embeddings", key, R"({"model":"m-normal"})").status == 400);
  CHECK(client.post("/v1/embeddings", key, R"({"model":"m-normal","input":[{"x":1}]})").status == 400);
  CHECK(client.post("/v1/embeddings", key, R"({"model":"nope","input":"x"})").status == 404);
  auto echo = client.post("/v1/embeddings", key, R"({"model":"echo-only","input":"x"})");
  CHECK(echo.status == 400);
  CHECK(echo.json().at("error").at("message").as_string().find("embeddings") != std::string::npos);
  CHECK(client.post("/v1/embeddings", key, R"({"model":"m-500","input":"x"})").status == 502);
  CHECK(client.post("/v1/embeddings", "tg-wrong", R"({"model":"m-normal","input":"x"})").status == 401);

  // A request quota counts embeddings like any call.
  CHECK(client.post("/v1/embeddings", limited, R"({"model":"m-normal","input":"x"})").status == 200);
  CHECK(client.post("/v1/embeddings", limited, R"({"model":"m-normal","input":"x"})").status == 429);
  CHECK(wait_usage_rows(gw.db(),
                        "model='m-normal' AND status=200 AND prompt_tokens=14 AND completion_tokens=0 AND estimated=0",
                        1) == 1);
}

TEST_CASE("openai backend: Groq's x_groq.usage is exact, and an upstream without usage is estimated",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto r = client.post("/v1/chat/completions", key, stream_body("m-groq", true));
  REQUIRE(r.status == 200);
  auto s = parse_stream(r.body);
  REQUIRE(s.usage);
  CHECK(s.usage->at("prompt_tokens") == 17);
  CHECK(s.usage->at("completion_tokens") == 6);
  r = client.post("/v1/chat/completions", key, chat_body("m-groq", "hi"));
  REQUIRE(r.status == 200);
  CHECK(r.json().at("usage").at("completion_tokens") == 6);

  r = client.post("/v1/chat/completions", key, stream_body("m-nousage", true));
  REQUIRE(r.status == 200);
  s = parse_stream(r.body);
  CHECK(s.text == "Hello from fake upstream");
  REQUIRE(s.usage);
  CHECK(s.usage->at("completion_tokens") == 4);  // one per streamed piece
  r = client.post("/v1/chat/completions", key, chat_body("m-nousage", "hi"));
  REQUIRE(r.status == 200);

  CHECK(wait_usage_rows(gw.db(), "model='m-groq' AND prompt_tokens=17 AND completion_tokens=6 AND estimated=0", 2) ==
        2);
  CHECK(wait_usage_rows(gw.db(), "model='m-nousage' AND status=200 AND estimated=1 AND completion_tokens>0", 2) == 2);
  CHECK(count_usage_rows(gw.db(), "model='m-nousage' AND estimated=1 AND completion_tokens=4") == 1);
}

TEST_CASE("openai backend: with a tokenizer, unreported usage is counted with it (and still marked estimated)",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  std::string url = "http://127.0.0.1:" + std::to_string(fake.port()) + "/v1";
  GatewayProcess gw(dir, with_config("backends:\n"
                                     "  - {name: counted, type: openai, base_url: '" + url + "', tokenizer: " +
                                     shared_model("tok512.bin") +
                                     "}\n"
                                     "models:\n"
                                     "  - {name: m-counted, deployments: [{backend: counted, model: nousage}]}\n"));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  tollgate::local_engine::Tokenizer tok512(tollgate::local_engine::load_llama2c_tokenizer(shared_model("tok512.bin")));
  auto completion = static_cast<std::int64_t>(tok512.encode("Hello from fake upstream", false).size());
  auto prompt = static_cast<std::int64_t>(tok512.encode("hi there", false).size()) + 4;  // + the template's share
  REQUIRE(completion != 4);  // differs from the one-per-piece count, so the test tells them apart

  HttpClient client(gw.port());
  auto r = client.post("/v1/chat/completions", key, stream_body("m-counted", true));
  REQUIRE(r.status == 200);
  auto s = parse_stream(r.body);
  CHECK(s.text == "Hello from fake upstream");
  REQUIRE(s.usage);
  CHECK(s.usage->at("completion_tokens") == completion);
  CHECK(s.usage->at("prompt_tokens") == prompt);
  CHECK(wait_usage_rows(gw.db(),
                        "model='m-counted' AND estimated=1 AND completion_tokens=" + std::to_string(completion) +
                            " AND prompt_tokens=" + std::to_string(prompt),
                        1) == 1);

  // A tokenizer that cannot be read stops the start with a message naming it.
  auto config = dir.file("bad.yaml");
  std::ofstream(config) << "backends: [{name: b, type: openai, base_url: 'http://127.0.0.1:9', tokenizer: " +
                               dir.file("absent.bin") + "}]\n";
  auto bad = run_tollgate({"serve", "--config", config, "--listen", "127.0.0.1:0", "--db", dir.file("b.db")});
  CHECK(bad.exit_code == 1);
  CHECK(bad.err.find("backend 'b': tokenizer") != std::string::npos);
}

TEST_CASE("openai backend: upstream failures map to 502, 504, 429, 400, 404 and a mid-stream error event",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  auto refused = "  - {name: down, type: openai, base_url: 'http://127.0.0.1:" + std::to_string(closed_port()) +
                 "/v1', api_key: '${PROVIDER_KEY}'}\n";
  GatewayProcess gw(dir, with_config(fake_config(fake.port(), refused,
                                                 "  - {name: m-down, deployments: [{backend: down}]}\n")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  std::string responses;

  auto r = client.post("/v1/chat/completions", key, chat_body("m-down", "hi"));
  CHECK(r.status == 502);
  CHECK(r.json().at("error").at("code") == "upstream_error");
  responses += r.body;

  r = client.post("/v1/chat/completions", key, chat_body("m-hang", "hi"));
  CHECK(r.status == 504);
  CHECK(r.json().at("error").at("code") == "upstream_timeout");
  responses += r.body;

  r = client.post("/v1/chat/completions", key, chat_body("m-429", "hi"));
  CHECK(r.status == 429);
  CHECK(r.header("retry-after") == "7");
  CHECK(std::string(r.json().at("error").at("message").as_string()).find("Rate limit reached") != std::string::npos);
  responses += r.body;

  r = client.post("/v1/chat/completions", key, stream_body("m-500", true));
  CHECK(r.status == 502);
  responses += r.body;

  r = client.post("/v1/chat/completions", key, chat_body("m-400", "hi"));
  CHECK(r.status == 400);
  CHECK(std::string(r.json().at("error").at("message").as_string()).find("bad thing") != std::string::npos);
  CHECK(r.json().at("error").at("param") == "temperature");  // the upstream's code and param come through
  CHECK(r.json().at("error").at("code") == "invalid_value");

  r = client.post("/v1/chat/completions", key, chat_body("m-404", "hi"));
  CHECK(r.status == 404);

  // Death mid-stream: the status is already 200, so an SSE error event, then close.
  r = client.post("/v1/chat/completions", key, stream_body("m-die", true));
  CHECK(r.status == 200);
  auto s = parse_stream(r.body);
  CHECK(s.text == "Hello from");
  CHECK(s.error);
  CHECK_FALSE(s.done);
  CHECK(client.wait_closed(5s));
  responses += r.body;

  // Every failure is metered, with what was produced before it.
  CHECK(wait_usage_rows(gw.db(), "model='m-down' AND status=502", 1) == 1);
  CHECK(wait_usage_rows(gw.db(), "model='m-hang' AND status=504", 1) == 1);
  CHECK(wait_usage_rows(gw.db(), "model='m-429' AND status=429", 1) == 1);
  CHECK(wait_usage_rows(gw.db(), "model='m-500' AND status=502", 1) == 1);
  CHECK(wait_usage_rows(gw.db(), "model='m-die' AND status=502 AND completion_tokens=2 AND estimated=1", 1) == 1);

  HttpClient metrics(gw.port());
  auto m = metrics.get("/metrics").body;
  CHECK(m.find(R"(tollgate_backend_errors_total{backend="up",kind="rate_limited"} 1)") != std::string::npos);
  CHECK(m.find(R"(tollgate_backend_errors_total{backend="down",kind="upstream_failed"} 1)") != std::string::npos);
  CHECK(m.find(R"(tollgate_backend_errors_total{backend="up-impatient",kind="timeout"} 1)") != std::string::npos);

  {
    std::ofstream(dir.file("metrics.txt")) << m;
    auto check = "promtool check metrics < '" + dir.file("metrics.txt") + "' > '" + dir.file("promtool.out") + "' 2>&1";
    std::stringstream promtool;
    int rc = std::system(check.c_str());
    promtool << std::ifstream(dir.file("promtool.out")).rdbuf();
    INFO(promtool.str());
    CHECK(rc == 0);
  }

  // The provider key never leaves the gateway, not even in its log.
  CHECK(responses.find(kProviderKey) == std::string::npos);
  CHECK(gw.log().find(kProviderKey) == std::string::npos);
}

TEST_CASE("openai backend: a client leaving mid-stream cancels the upstream call and pays for what it got",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  {
    HttpClient client(gw.port());
    start_stream(client, key, "m-slow", "t2 ");
  }  // the client closes its connection here
  // The slow answer would take 30 s; the fake sees its client go away long before.
  std::int64_t disconnects = 0;
  for (int i = 0; i < 150 && disconnects == 0; ++i) {
    disconnects = fake.stats().at("disconnects").as_int64();
    if (disconnects == 0) std::this_thread::sleep_for(100ms);
  }
  CHECK(disconnects == 1);
  CHECK(wait_usage_rows(gw.db(), "model='m-slow' AND status=499 AND completion_tokens>=3 AND estimated=1", 1) == 1);
}

TEST_CASE("openai backend: a client that stops reading slows the upstream down instead of being buffered for",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  start_stream(client, key, "m-flood", "ffff");
  // The client reads nothing more: socket buffers fill, then the gateway's
  // queue, then the gateway stops reading the upstream, which stalls.
  auto flood_sent = [&] { return fake.stats().at("flood_sent").as_int64(); };
  std::this_thread::sleep_for(3s);
  auto stalled_at = flood_sent();
  std::this_thread::sleep_for(1s);
  INFO("pieces sent: " << stalled_at);
  // The whole answer is 100000 pieces (~100 MiB): without backpressure it
  // would have been read (and buffered) long ago.
  CHECK(stalled_at < 40000);
  CHECK(flood_sent() - stalled_at < 1000);
  HttpClient other(gw.port());
  auto metrics = other.get("/metrics").body;
  auto rss_at = metrics.find("\nprocess_resident_memory_bytes ");
  REQUIRE(rss_at != std::string::npos);
  CHECK(std::stod(metrics.substr(rss_at + 31)) < 300e6);
  // Reading again, the stream goes on from where it was.
  std::size_t more = 0;
  auto deadline = std::chrono::steady_clock::now() + 20s;
  while (more < (8u << 20) && std::chrono::steady_clock::now() < deadline) more += client.read_some(100ms).size();
  CHECK(more >= (8u << 20));
  CHECK(flood_sent() > stalled_at);
}

// The gateway's peak resident memory (VmHWM) in bytes, from /proc.
double peak_rss(int pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with("VmHWM:")) return std::stod(line.substr(6)) * 1024;
  }
  return -1;
}

TEST_CASE("openai backend: an upstream that never ends a line or an answer is cut off in bounded memory",
          "[e2e][openai][caps]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config(fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto started = std::chrono::steady_clock::now();
  double peak_before = peak_rss(gw.pid());
  REQUIRE(peak_before > 0);

  // After a delta the status is 200 already: an error event, no [DONE], and the end of the stream.
  HttpClient client(gw.port(), 20s);
  auto r = client.post("/v1/chat/completions", key, stream_body("m-longline", true));
  CHECK(r.status == 200);
  auto s = parse_stream(r.body);
  CHECK(s.text == "Hello");
  CHECK(s.error);
  CHECK_FALSE(s.done);
  CHECK(r.body.find("larger than 4 MiB") != std::string::npos);
  CHECK(client.wait_closed(5s));
  // The gateway let go of the upstream connection: the fake's writes failed,
  // long before the 200 MB it would have sent.
  std::int64_t disconnects = 0;
  for (int i = 0; i < 100 && disconnects == 0; ++i) {
    disconnects = fake.stats().at("disconnects").as_int64();
    if (disconnects == 0) std::this_thread::sleep_for(50ms);
  }
  CHECK(disconnects == 1);
  auto sent = fake.stats().at("big_sent").as_int64();
  INFO("bytes sent: " << sent);
  CHECK(sent >= 4 * 1024 * 1024);
  CHECK(sent < 64 * 1024 * 1024);

  // Before any delta: a 502 JSON error.
  HttpClient second(gw.port(), 20s);
  r = second.post("/v1/chat/completions", key, stream_body("m-longline-first", true));
  CHECK(r.status == 502);
  CHECK(r.json().at("error").at("code") == "upstream_error");
  CHECK(std::string(r.json().at("error").at("message").as_string()).find("larger than 4 MiB") != std::string::npos);

  // A non-streamed answer that never ends: cut at its cap.
  r = second.post("/v1/chat/completions", key, chat_body("m-huge", "hi"));
  CHECK(r.status == 502);
  CHECK(std::string(r.json().at("error").at("message").as_string()).find("larger than 16 MiB") != std::string::npos);

  // Chunked framing that never ends (a chunk header without its line end).
  HttpClient third(gw.port(), 20s);
  r = third.post("/v1/chat/completions", key, stream_body("m-longchunk", true));
  CHECK(r.status == 200);
  INFO(r.body.substr(0, 2000));
  CHECK(parse_stream(r.body).error);
  CHECK(r.body.find("chunk framing is larger than 1 MiB") != std::string::npos);

  double peak_after = peak_rss(gw.pid());
  INFO("peak RSS before " << peak_before / 1e6 << " MB, after " << peak_after / 1e6 << " MB");
#ifdef __SANITIZE_ADDRESS__
  const double growth_cap = 192e6;  // ASan's quarantine keeps freed blocks resident (256 MB by default)
#else
  const double growth_cap = 64e6;
#endif
  CHECK(peak_after - peak_before < growth_cap);
  CHECK(std::chrono::steady_clock::now() - started < 20s);

  // And the gateway still serves.
  r = second.post("/v1/chat/completions", key, chat_body("m-normal", "hi"));
  CHECK(r.status == 200);
  CHECK(r.json().at("choices").at(0).at("message").at("content") == "Hello from fake upstream");
  CHECK(wait_usage_rows(gw.db(), "model='m-longline' AND status=502 AND completion_tokens=1", 1) == 1);
}

TEST_CASE("openai backend over TLS: verified with ca_file, refused without it, insecure_skip_verify warns",
          "[e2e][openai][tls]") {
  TempDir dir;
  auto certs = make_test_certificates(dir);
  FakeOpenAI fake(certs.cert, certs.key);
  std::string url = "https://127.0.0.1:" + std::to_string(fake.port()) + "/v1";
  std::string yaml = "backends:\n"
                     "  - {name: verified, type: openai, base_url: '" + url + "', ca_file: '" + certs.ca + "'}\n"
                     "  - {name: named, type: openai, base_url: 'https://localhost:" + std::to_string(fake.port()) +
                     "/v1', ca_file: '" + certs.ca + "'}\n"
                     "  - {name: untrusted, type: openai, base_url: '" + url + "'}\n"
                     "  - {name: insecure, type: openai, base_url: '" + url + "', insecure_skip_verify: true}\n"
                     "models:\n"
                     "  - {name: verified, deployments: [{backend: verified, model: normal}]}\n"
                     "  - {name: named, deployments: [{backend: named, model: normal}]}\n"
                     "  - {name: untrusted, deployments: [{backend: untrusted, model: normal}]}\n"
                     "  - {name: insecure, deployments: [{backend: insecure, model: normal}]}\n";
  GatewayProcess gw(dir, with_config(yaml));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto r = client.post("/v1/chat/completions", key, chat_body("verified", "hi"));
  CHECK(r.status == 200);
  CHECK(r.body.find("Hello from fake upstream") != std::string::npos);
  r = client.post("/v1/chat/completions", key, stream_body("verified", true));
  CHECK(r.status == 200);
  auto s = parse_stream(r.body);
  CHECK(s.text == "Hello from fake upstream");
  REQUIRE(s.usage);
  CHECK(s.usage->at("completion_tokens") == 5);
  // A second call reuses the pooled TLS connection.
  r = client.post("/v1/chat/completions", key, chat_body("verified", "again"));
  CHECK(r.status == 200);

  r = client.post("/v1/chat/completions", key, chat_body("named", "hi"));
  CHECK(r.status == 200);

  r = client.post("/v1/chat/completions", key, chat_body("untrusted", "hi"));
  CHECK(r.status == 502);
  CHECK(r.body.find("certificate verify failed") != std::string::npos);

  r = client.post("/v1/chat/completions", key, chat_body("insecure", "hi"));
  CHECK(r.status == 200);
  auto log = gw.log();
  CHECK(log.find("backend 'insecure': insecure_skip_verify is on") != std::string::npos);
  CHECK(log.find("backend 'verified': insecure_skip_verify") == std::string::npos);
}

TEST_CASE("openai backend: Tollgate chained to a second Tollgate", "[e2e][openai][chain]") {
  TempDir dir;
  GatewayProcess inner(dir);  // the echo model
  auto inner_key = create_key(inner.db(), "gateway-b");
  wait_for_key(inner.port(), inner_key);
  std::string yaml = "backends:\n"
                     "  - name: inner\n"
                     "    type: openai\n"
                     "    base_url: http://127.0.0.1:" + std::to_string(inner.port()) + "/v1\n"
                     "    api_key: ${PROVIDER_KEY}\n"
                     "models:\n"
                     "  - {name: relayed-echo, deployments: [{backend: inner, model: echo}]}\n";
  GatewayProcess::Options options;
  options.config_yaml = yaml;
  options.env = {{"PROVIDER_KEY", inner_key}};
  GatewayProcess outer(dir, options);
  auto key = create_key(outer.db(), "alice");
  wait_for_key(outer.port(), key);
  HttpClient client(outer.port());

  auto r = client.post("/v1/chat/completions", key, chat_body("relayed-echo", "one two three"));
  REQUIRE(r.status == 200);
  CHECK(r.json().at("model") == "relayed-echo");
  CHECK(r.json().at("choices").at(0).at("message").at("content") == "one two three");
  CHECK(r.json().at("usage").at("prompt_tokens") == 3);
  CHECK(r.json().at("usage").at("completion_tokens") == 3);

  r = client.post("/v1/completions", key,
                  R"({"model":"relayed-echo","prompt":"a b c d e","max_tokens":4,"stream":true,)"
                  R"("stream_options":{"include_usage":true}})");
  REQUIRE(r.status == 200);
  auto s = parse_stream(r.body, false);
  CHECK(s.text == "a b c d");
  CHECK(s.done);
  REQUIRE(s.usage);
  CHECK(s.usage->at("prompt_tokens") == 5);
  CHECK(s.usage->at("completion_tokens") == 4);

  r = client.post("/v1/chat/completions", key, stream_body("relayed-echo", false));
  REQUIRE(r.status == 200);
  s = parse_stream(r.body);
  CHECK(s.text == "hi there");
  CHECK_FALSE(s.usage);

  // Both gateways meter the same, exact counts.
  for (const auto* db : {&outer.db(), &inner.db()}) {
    CHECK(wait_usage_rows(*db, "status=200 AND prompt_tokens=3 AND completion_tokens=3 AND estimated=0", 1) == 1);
    CHECK(wait_usage_rows(*db, "status=200 AND prompt_tokens=5 AND completion_tokens=4 AND estimated=0", 1) == 1);
    CHECK(wait_usage_rows(*db, "status=200 AND prompt_tokens=2 AND completion_tokens=2 AND estimated=0", 1) == 1);
  }
}

TEST_CASE("openai backend config: unknown keys and bad URLs are refused by name", "[e2e][openai][config]") {
  TempDir dir;
  auto write = [&](const std::string& name, const std::string& backend) {
    auto path = dir.file(name);
    std::ofstream(path) << "backends:\n  - " << backend << "\nmodels: [{name: m, deployments: [{backend: b}]}]\n";
    return path;
  };
  auto ok = run_tollgate({"config", "check",
                          write("ok.yaml", "{name: b, type: openai, base_url: 'https://api.groq.com/openai/v1', "
                                           "api_key: k, headers: {X-A: b}, timeouts: {connect: 1s, total: 5m}, "
                                           "max_connections: 8, insecure_skip_verify: false}")});
  CHECK(ok.exit_code == 0);
  auto unknown = run_tollgate({"config", "check", write("unknown.yaml", "{name: b, type: openai, base_url: "
                                                                        "'http://x/v1', api_keyy: k}")});
  CHECK(unknown.exit_code != 0);
  CHECK(unknown.err.find("api_keyy") != std::string::npos);
  auto timeout = run_tollgate({"config", "check", write("timeout.yaml", "{name: b, type: openai, base_url: "
                                                                        "'http://x/v1', timeouts: {firstbyte: 1s}}")});
  CHECK(timeout.exit_code != 0);
  CHECK(timeout.err.find("firstbyte") != std::string::npos);
  auto scheme = run_tollgate({"config", "check", write("scheme.yaml", "{name: b, type: openai, base_url: 'ftp://x'}")});
  CHECK(scheme.exit_code != 0);
  CHECK(scheme.err.find("base_url") != std::string::npos);
}

TEST_CASE("openai backend: a stream outlasts header_timeout, even while its client is slow to read",
          "[e2e][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, with_config("limits: {header_timeout: 300ms, idle_timeout: 10s}\n" +
                                     fake_config(fake.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  start_stream(client, key, "m-flood", "ffff");
  // Not reading for a while leaves the gateway's write to this client pending
  // well past header_timeout, which bounds only the reading of the request.
  std::this_thread::sleep_for(1500ms);
  // Far more than socket buffers and the gateway's queue hold: the stream is alive.
  // Bounded by time, not by reads: a slow host hands over small pieces. A
  // closed or stalled stream ends the loop at once with an empty read.
  std::size_t got = 0;
  auto deadline = std::chrono::steady_clock::now() + 90s;
  while (got < 32u * 1024 * 1024 && std::chrono::steady_clock::now() < deadline) {
    auto piece = client.read_some(5s);
    if (piece.empty()) break;
    got += piece.size();
  }
  CHECK(got >= 32u * 1024 * 1024);
}
