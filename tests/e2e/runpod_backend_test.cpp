// The `runpod` backend through the real binary, against a fake serverless
// endpoint (tests/e2e/fake_runpod.py): a chat completion, streamed and not,
// polled to its end, with the upstream's usage in the usage rows.
#include <catch2/catch.hpp>

#include "harness.hpp"
#include "upstream.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

const std::string kRunpodKey = "rp-e2e-secret-0123456789abcdef";

std::string runpod_config(std::uint16_t port) {
  return "metering: {flush_interval: 100ms}\n"
         "backends:\n"
         "  - name: rp\n"
         "    type: runpod\n"
         "    base_url: http://127.0.0.1:" +
         std::to_string(port) +
         "/v2\n"
         "    endpoint: ep-e2e\n"
         "    api_key: ${RUNPOD_KEY}\n"
         "    poll_interval_ms: 20\n"
         "    timeouts: {connect: 5s, total: 30s}\n"
         "models:\n"
         "  - {name: m-runpod, deployments: [{backend: rp, model: served-model}]}\n";
}

json::value fake_get(std::uint16_t port, const std::string& path) {
  HttpClient client(port);
  return client.get(path).json();
}

}  // namespace

TEST_CASE("runpod backend: a chat completion, streamed and not, metered with the upstream's usage", "[e2e][runpod]") {
  TempDir dir;
  FakeServer fake("fake_runpod.py", {"--key", kRunpodKey});
  GatewayProcess::Options options;
  options.config_yaml = runpod_config(fake.port());
  options.env = {{"RUNPOD_KEY", kRunpodKey}};
  GatewayProcess gw(dir, options);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto r = client.post("/v1/chat/completions", key, chat_body("m-runpod", "hello serverless"));
  REQUIRE(r.status == 200);
  auto body = r.json().as_object();
  CHECK(body.at("model") == "m-runpod");
  CHECK(body.at("choices").at(0).at("message").at("content") == "Hello from fake runpod");
  CHECK(body.at("choices").at(0).at("finish_reason") == "stop");
  CHECK(body.at("usage").at("prompt_tokens") == 12);
  CHECK(body.at("usage").at("completion_tokens") == 4);
  auto last = fake_get(fake.port(), "/_last").as_object();
  CHECK(last.at("path") == "/v2/ep-e2e/runsync");
  CHECK(last.at("authorization") == json::value("Bearer " + kRunpodKey));
  CHECK(last.at("body").at("input").at("model") == "served-model");
  CHECK(last.at("body").at("input").at("messages").at(0).at("content") == "hello serverless");
  CHECK(last.at("body").at("input").at("stream") == false);

  r = client.post("/v1/chat/completions", key,
                  R"({"model":"m-runpod","stream":true,"stream_options":{"include_usage":true},)"
                  R"("messages":[{"role":"user","content":"hello stream"}]})");
  REQUIRE(r.status == 200);
  CHECK(r.header("content-type") == "text/event-stream");
  std::vector<std::string> deltas;
  std::optional<json::object> usage;
  bool done = false;
  for (const auto& data : sse_data(r.body)) {
    if (data == "[DONE]") {
      done = true;
      continue;
    }
    auto event = json::parse(data).as_object();
    if (auto* u = event.if_contains("usage"); u && u->is_object()) usage = u->as_object();
    const auto& choices = event.at("choices").as_array();
    if (choices.empty()) continue;
    if (auto* t = choices[0].at("delta").as_object().if_contains("content"); t && t->is_string()) {
      deltas.emplace_back(t->get_string());
    }
  }
  CHECK(done);
  CHECK(deltas == std::vector<std::string>{"Hello", " from", " fake", " runpod"});
  REQUIRE(usage);
  CHECK(usage->at("prompt_tokens") == 12);
  CHECK(usage->at("completion_tokens") == 4);
  last = fake_get(fake.port(), "/_last").as_object();
  CHECK(last.at("path") == "/v2/ep-e2e/run");
  CHECK(last.at("body").at("input").at("stream") == true);
  auto stats = fake_get(fake.port(), "/_stats");
  CHECK(stats.at("requests") == 2);
  CHECK(stats.at("polls") == 5);  // two status polls, three stream polls
  CHECK(stats.at("cancels") == 0);

  CHECK(wait_usage_rows(gw.db(),
                        "backend='rp' AND model='m-runpod' AND route='/v1/chat/completions' AND status=200 AND "
                        "prompt_tokens=12 AND completion_tokens=4 AND estimated=0",
                        2) == 2);
}
