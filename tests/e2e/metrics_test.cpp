// GET /metrics through the real binary: valid exposition (promtool agrees)
// and series whose values match the traffic that was sent.
#include <catch2/catch.hpp>

#include <signal.h>

#include <cstdlib>
#include <map>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;

namespace {

using Clock = std::chrono::steady_clock;

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses the sample lines of a text exposition (comments skipped).
std::vector<Sample> parse_samples(const std::string& text) {
  std::vector<Sample> samples;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.empty() || line[0] == '#') continue;
    Sample s;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') s.name += line[i++];
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        auto eq = line.find('=', i);
        std::string key = line.substr(i, eq - i);
        i = eq + 2;  // past ="
        std::string value;
        while (i < line.size() && line[i] != '"') {
          if (line[i] == '\\' && i + 1 < line.size()) {
            ++i;
            value += line[i] == 'n' ? '\n' : line[i];
          } else {
            value += line[i];
          }
          ++i;
        }
        ++i;  // past the closing quote
        if (i < line.size() && line[i] == ',') ++i;
        s.labels[key] = value;
      }
      ++i;  // past }
    }
    auto value = line.substr(i);
    auto space = value.find_first_not_of(' ');
    value = value.substr(space);
    value = value.substr(0, value.find(' '));  // drop a timestamp
    s.value = std::stod(value);
    samples.push_back(std::move(s));
  }
  return samples;
}

// The value of the one sample of `name` whose labels include `labels`.
std::optional<double> value_of(const std::vector<Sample>& samples, const std::string& name,
                               const std::map<std::string, std::string>& labels = {}) {
  std::optional<double> found;
  for (const auto& s : samples) {
    if (s.name != name) continue;
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      if (it == s.labels.end() || it->second != v) match = false;
    }
    if (!match) continue;
    if (found) throw std::runtime_error("more than one sample of " + name + " matches");
    found = s.value;
  }
  return found;
}

double sum_of(const std::vector<Sample>& samples, const std::string& name) {
  double total = 0;
  for (const auto& s : samples) {
    if (s.name == name) total += s.value;
  }
  return total;
}

std::string scrape(std::uint16_t port) {
  HttpClient client(port);
  auto r = client.get("/metrics");
  REQUIRE(r.status == 200);
  REQUIRE(r.header("content-type").starts_with("text/plain; version=0.0.4"));
  return r.body;
}

std::string config(bool per_user) {
  return std::string("metering: {flush_interval: 100ms, per_user_metrics: ") + (per_user ? "true" : "false") + R"(}
backends:
  - {name: echo, type: echo, token_delay: 5ms}
models:
  - name: echo
    deployments: [{backend: echo}]
)";
}

// Polls /metrics (bounded) until the usage writer has committed a batch.
std::vector<Sample> scrape_after_flush(std::uint16_t port, std::string& text) {
  auto deadline = Clock::now() + 10s;
  for (;;) {
    text = scrape(port);
    auto samples = parse_samples(text);
    if (value_of(samples, "tollgate_metering_flush_duration_seconds_count").value_or(0) > 0 || Clock::now() > deadline) {
      return samples;
    }
    std::this_thread::sleep_for(50ms);
  }
}

}  // namespace

TEST_CASE("/metrics passes promtool and its series match the traffic", "[e2e][metrics]") {
  TempDir dir;
  auto db = dir.file("metrics.db");
  auto key = create_key(db, "alice");
  auto limited = create_key(db, "bob", {"--rpd", "1"});
  GatewayProcess gw(dir, {config(false), db, {}});
  HttpClient client(gw.port());

  constexpr int kPlain = 7, kStreamed = 2;
  std::int64_t prompt = 0, completion = 0;
  for (int i = 0; i < kPlain; ++i) {
    auto r = client.post("/v1/chat/completions", key, chat_body("echo", "hello metrics world"));
    REQUIRE(r.status == 200);
    prompt += r.json().at("usage").at("prompt_tokens").as_int64();
    completion += r.json().at("usage").at("completion_tokens").as_int64();
  }
  for (int i = 0; i < kStreamed; ++i) {
    auto r = client.post("/v1/chat/completions", key, chat_body("echo", "streamed tokens arrive", R"("stream":true)"));
    REQUIRE(r.status == 200);
    REQUIRE(r.body.find("data: [DONE]") != std::string::npos);
    prompt += 3;  // the echo backend: one token a word, the reply echoes the prompt
    completion += 3;
  }
  REQUIRE(client.post("/v1/chat/completions", key, chat_body("no-such-model", "hi")).status == 404);
  REQUIRE(client.get("/v1/models", limited).status == 200);
  REQUIRE(client.get("/v1/models", limited).status == 429);
  constexpr int kRequests = kPlain + kStreamed + 3;

  std::string text;
  auto samples = scrape_after_flush(gw.port(), text);

  auto [code, output] = promtool_check(dir, text);
  INFO(output);
  REQUIRE(code == 0);

  const std::string chat = "/v1/chat/completions";
  CHECK(value_of(samples, "tollgate_http_requests_total", {{"route", chat}, {"status", "200"}}) == kPlain + kStreamed);
  CHECK(value_of(samples, "tollgate_http_requests_total", {{"route", chat}, {"status", "404"}}) == 1);
  CHECK(value_of(samples, "tollgate_http_requests_total", {{"route", "/v1/models"}, {"status", "429"}}) == 1);
  CHECK(value_of(samples, "tollgate_tokens_total", {{"direction", "prompt"}, {"model", "echo"}, {"backend", "echo"}}) ==
        static_cast<double>(prompt));
  CHECK(value_of(samples, "tollgate_tokens_total", {{"direction", "completion"}, {"model", "echo"}, {"backend", "echo"}}) ==
        static_cast<double>(completion));
  CHECK(sum_of(samples, "tollgate_quota_rejections_total") == 1);
  CHECK(value_of(samples, "tollgate_quota_rejections_total", {{"limit", "requests_per_day"}}) == 1);
  // The scrape being answered is the only request in flight.
  CHECK(value_of(samples, "tollgate_http_requests_in_flight") == 1);
  auto depth = value_of(samples, "tollgate_metering_queue_depth");
  REQUIRE(depth);
  CHECK(*depth >= 0);
  CHECK(*depth <= kRequests);
  CHECK(value_of(samples, "tollgate_metering_flush_duration_seconds_count").value_or(0) > 0);
  CHECK(value_of(samples, "tollgate_metering_rows_written_total").value_or(0) > 0);
  CHECK(value_of(samples, "process_resident_memory_bytes").value_or(0) > 0);
  CHECK(value_of(samples, "process_open_fds").value_or(0) > 0);
  auto cpu = value_of(samples, "process_cpu_seconds_total");
  REQUIRE(cpu);
  CHECK(*cpu >= 0);
  CHECK(value_of(samples, "tollgate_time_to_first_token_seconds_count", {{"model", "echo"}, {"backend", "echo"}}) ==
        kStreamed);
  // Every finished request is observed, the scrapes before this one included.
  CHECK(value_of(samples, "tollgate_gateway_overhead_seconds_count").value_or(0) >= kRequests);
  CHECK(value_of(samples, "tollgate_http_request_duration_seconds_count", {{"route", chat}}) == kPlain + kStreamed + 1);

  // Per-user series are off by default: the family may be described, never sampled.
  CHECK(text.find("\ntollgate_user_requests_total") == std::string::npos);
  CHECK(text.find("\ntollgate_user_tokens_total") == std::string::npos);
}

TEST_CASE("per-user request series appear only when per_user_metrics is on", "[e2e][metrics]") {
  TempDir dir;
  auto db = dir.file("metrics.db");
  auto alice = create_key(db, "alice");
  auto bob = create_key(db, "bob");
  GatewayProcess gw(dir, {config(true), db, {}});
  HttpClient client(gw.port());
  for (int i = 0; i < 3; ++i) REQUIRE(client.post("/v1/chat/completions", alice, chat_body("echo", "a b")).status == 200);
  REQUIRE(client.get("/v1/models", bob).status == 200);
  REQUIRE(client.post("/v1/chat/completions", bob, "{not json").status == 400);

  auto text = scrape(gw.port());
  auto [code, output] = promtool_check(dir, text);
  INFO(output);
  REQUIRE(code == 0);
  auto samples = parse_samples(text);
  CHECK(value_of(samples, "tollgate_user_requests_total", {{"user", "alice"}}) == 3);
  CHECK(value_of(samples, "tollgate_user_requests_total", {{"user", "bob"}}) == 2);
  CHECK(value_of(samples, "tollgate_user_tokens_total", {{"user", "alice"}, {"direction", "prompt"}}) == 6);
  CHECK(value_of(samples, "tollgate_user_tokens_total", {{"user", "alice"}, {"direction", "completion"}}) == 6);
  REQUIRE(gw.stop(SIGTERM) == 0);
}

TEST_CASE("/v1/embeddings has its own route label in metrics and usage", "[e2e][metrics]") {
  TempDir dir;
  GatewayProcess gw(dir, {config(false), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  // The echo backend serves no embeddings: a 400, labelled with its route all the same.
  CHECK(client.post("/v1/embeddings", key, R"({"model":"echo","input":"hi"})").status == 400);
  CHECK(client.post("/v1/embeddings", key, R"({"model":"echo"})").status == 400);
  auto samples = parse_samples(scrape(gw.port()));
  CHECK(value_of(samples, "tollgate_http_requests_total", {{"route", "/v1/embeddings"}, {"status", "400"}}) == 2);
  CHECK_FALSE(value_of(samples, "tollgate_http_requests_total", {{"route", "other"}}));
  // With a healthy store the writer's queue never fills: the counter is there, at 0.
  CHECK(value_of(samples, "tollgate_metering_rows_dropped_total") == 0);
  // Rows are written behind: wait for these two (wait_for_key's own calls are metered too).
  for (int i = 0; i < 100 && count_usage_rows(gw.db(), "route = '/v1/embeddings'") < 2; ++i) {
    std::this_thread::sleep_for(50ms);
  }
  CHECK(count_usage_rows(gw.db(), "route = '/v1/embeddings'") == 2);
  CHECK(count_usage_rows(gw.db(), "route = 'other'") == 0);
}
