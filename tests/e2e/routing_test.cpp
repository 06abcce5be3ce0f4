// Routing across several deployments of one model: fallback before the first
// byte, passive health with cooldown, weighted and least-busy choice.
#include <catch2/catch.hpp>

#include <csignal>
#include <thread>

#include "harness.hpp"
#include "upstream.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

std::string backends_yaml(std::uint16_t fake_port) {
  return "backends:\n"
         "  - {name: up, type: openai, base_url: 'http://127.0.0.1:" + std::to_string(fake_port) + "/v1'}\n"
         "  - {name: gone, type: openai, base_url: 'http://127.0.0.1:" + std::to_string(closed_port()) + "/v1'}\n"
         "  - {name: echo, type: echo}\n"
         "  - {name: echo-b, type: echo}\n"
         "  - {name: echo-slow, type: echo, token_delay: 100ms}\n"
         "  - {name: echo-slow-b, type: echo, token_delay: 100ms}\n";
}

GatewayProcess::Options config(const std::string& yaml) {
  GatewayProcess::Options o;
  o.config_yaml = yaml;
  return o;
}

std::int64_t fake_requests(FakeOpenAI& fake) { return fake.stats().at("requests").to_number<std::int64_t>(); }

}  // namespace

TEST_CASE("a retryable failure before the first byte falls back to the next deployment", "[e2e][routing]") {
  TempDir dir;
  FakeOpenAI fake;
  std::string yaml = backends_yaml(fake.port()) +
                     // The failing deployment carries nearly all the weight: it is tried first.
                     "models:\n"
                     "  - {name: after-500, deployments: [{backend: up, model: '500', weight: 1000000}, {backend: echo}]}\n"
                     "  - {name: after-429, deployments: [{backend: up, model: '429', weight: 1000000}, {backend: echo}]}\n"
                     "  - {name: after-refused, deployments: [{backend: gone, weight: 1000000}, {backend: echo}]}\n"
                     "  - {name: bad-request, deployments: [{backend: up, model: '400', weight: 1000000}, {backend: echo}]}\n"
                     "  - {name: all-down, deployments: [{backend: up, model: '500', weight: 1000000}, {backend: gone}]}\n";
  GatewayProcess gw(dir, config(yaml));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  for (std::string model : {"after-500", "after-429", "after-refused"}) {
    INFO(model);
    auto r = client.post("/v1/chat/completions", key, chat_body(model, "fall back please"));
    REQUIRE(r.status == 200);
    CHECK(r.json().at("choices").at(0).at("message").at("content") == "fall back please");
    // Streaming falls back the same way: nothing had reached the client.
    auto s = client.post("/v1/chat/completions", key, chat_body(model, "streamed too", R"("stream":true)"));
    REQUIRE(s.status == 200);
    CHECK(s.body.find("streamed") != std::string::npos);
    CHECK(s.body.find("data: [DONE]") != std::string::npos);
  }

  // A client error is the client's: no fallback.
  auto bad = client.post("/v1/chat/completions", key, chat_body("bad-request", "x"));
  CHECK(bad.status == 400);
  // When every deployment fails, the last failure is the answer.
  auto down = client.post("/v1/chat/completions", key, chat_body("all-down", "x"));
  CHECK(down.status == 502);

  REQUIRE(gw.stop(SIGTERM) == 0);
  // One row per client request, naming the deployment that answered.
  CHECK(count_usage_rows(gw.db(), "status = 200 AND backend = 'echo'") == 6);
  CHECK(count_usage_rows(gw.db(), "status = 400 AND backend = 'up'") == 1);
  CHECK(count_usage_rows(gw.db(), "status = 502 AND backend = 'gone'") == 1);
  CHECK(count_usage_rows(gw.db(), "route = '/v1/chat/completions'") == 8);
}

TEST_CASE("a failure after the first byte is not retried", "[e2e][routing]") {
  TempDir dir;
  FakeOpenAI fake;
  std::string yaml = backends_yaml(fake.port()) +
                     "models:\n"
                     "  - {name: dies, deployments: [{backend: up, model: die, weight: 1000000}, {backend: echo}]}\n";
  GatewayProcess gw(dir, config(yaml));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  auto r = client.post("/v1/chat/completions", key, chat_body("dies", "never echoed", R"("stream":true)"));
  REQUIRE(r.status == 200);
  auto events = sse_data(r.body);
  REQUIRE(!events.empty());
  CHECK(events.back().find("\"error\"") != std::string::npos);
  CHECK(r.body.find("never echoed") == std::string::npos);
  CHECK(fake_requests(fake) == 1);
}

TEST_CASE("consecutive failures cool a deployment down", "[e2e][routing]") {
  TempDir dir;
  FakeOpenAI fake;
  // The failing deployment carries nearly all the weight, so it is tried first
  // until its cooldown starts.
  std::string yaml = backends_yaml(fake.port()) +
                     "routing: {cooldown_failures: 2, cooldown: 60s}\n"
                     "models:\n"
                     "  - name: cooling\n"
                     "    deployments: [{backend: up, model: '500', weight: 1000000}, {backend: echo, weight: 1}]\n";
  GatewayProcess gw(dir, config(yaml));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  for (int i = 0; i < 10; ++i) {
    auto r = client.post("/v1/chat/completions", key, chat_body("cooling", "hello"));
    REQUIRE(r.status == 200);
  }
  CHECK(fake_requests(fake) == 2);
}

TEST_CASE("weights split traffic and least_busy avoids a busy deployment", "[e2e][routing]") {
  TempDir dir;
  FakeOpenAI fake;
  std::string yaml = backends_yaml(fake.port()) +
                     "models:\n"
                     "  - {name: split, deployments: [{backend: echo, weight: 3}, {backend: echo-b, weight: 1}]}\n"
                     "  - name: idle-first\n"
                     "    strategy: least_busy\n"
                     "    deployments: [{backend: echo-slow}, {backend: echo-slow-b}]\n";
  GatewayProcess gw(dir, config(yaml));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  HttpClient client(gw.port());
  constexpr int kRequests = 400;
  for (int i = 0; i < kRequests; ++i) REQUIRE(client.post("/v1/completions", key, R"({"model":"split","prompt":"x"})").status == 200);

  // A long stream keeps echo-slow busy; the next request goes to echo-slow-b.
  HttpClient busy(gw.port(), 30s);
  std::string words;
  for (int i = 0; i < 30; ++i) words += "w ";
  std::string body = R"({"model":"idle-first","stream":true,"prompt":")" + words + "\"}";
  REQUIRE(busy.send_raw(raw_post("/v1/completions", key, body)));
  std::string first;
  for (int i = 0; i < 50 && first.find("data: {") == std::string::npos; ++i) first += busy.read_some(100ms);
  REQUIRE(first.find("data: {") != std::string::npos);
  auto quick = client.post("/v1/completions", key, R"({"model":"idle-first","prompt":"one two"})");
  REQUIRE(quick.status == 200);

  REQUIRE(gw.stop(SIGTERM) == 0);
  auto a = count_usage_rows(gw.db(), "model = 'split' AND backend = 'echo'");
  auto b = count_usage_rows(gw.db(), "model = 'split' AND backend = 'echo-b'");
  CHECK(a + b == kRequests);
  // Expected 300 of 400 (sd ~9): the bounds are seven deviations wide.
  CHECK(a > 240);
  CHECK(a < 360);
  CHECK(count_usage_rows(gw.db(), "model = 'idle-first' AND backend = 'echo-slow-b' AND completion_tokens = 2") == 1);
}
