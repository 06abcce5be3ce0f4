#include "metering/metrics.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mt = tollgate::metering;

namespace {

// Runs a shell command and returns its exit status and combined output.
std::pair<int, std::string> run(const std::string& command) {
  std::FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) output.append(buf, n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

// The value of the label-less sample `name` in an exposition.
double sample(const std::string& text, const std::string& name) {
  const std::string prefix = "\n" + name + " ";
  const std::size_t at = ("\n" + text).find(prefix);
  if (at == std::string::npos) throw std::runtime_error("no sample " + name);
  return std::stod(text.substr(at + prefix.size() - 1));
}

}  // namespace

TEST_CASE("render writes counters, gauges and histograms in registration order", "[metering][metrics]") {
  mt::Registry registry;
  auto& requests = registry.counter("tollgate_requests_total", "Requests handled.", {"route", "status"});
  auto& inflight = registry.gauge("tollgate_inflight_requests", "Requests in flight.");
  auto& latency =
      registry.histogram("tollgate_request_duration_seconds", "Request latency.", {"route"}, {1, 0.125, 0.5});
  auto& tokens = registry.counter("tollgate_tokens_total", "Tokens generated.");
  registry.gauge("tollgate_backend_up", "Whether a backend answers.", {"backend"});

  requests.labels({"/v1/models", "404"}).inc();
  requests.labels({"/v1/chat/completions", "200"}).inc();
  requests.labels({"/v1/chat/completions", "200"}).inc(2);
  inflight.labels({}).set(5);
  inflight.labels({}).add(-2);
  for (double v : {0.0625, 0.125, 0.75, 2.0}) latency.labels({"/v1/models"}).observe(v);

  CHECK(registry.render() ==
        "# HELP tollgate_requests_total Requests handled.\n"
        "# TYPE tollgate_requests_total counter\n"
        "tollgate_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 3\n"
        "tollgate_requests_total{route=\"/v1/models\",status=\"404\"} 1\n"
        "# HELP tollgate_inflight_requests Requests in flight.\n"
        "# TYPE tollgate_inflight_requests gauge\n"
        "tollgate_inflight_requests 3\n"
        "# HELP tollgate_request_duration_seconds Request latency.\n"
        "# TYPE tollgate_request_duration_seconds histogram\n"
        "tollgate_request_duration_seconds_bucket{route=\"/v1/models\",le=\"0.125\"} 2\n"
        "tollgate_request_duration_seconds_bucket{route=\"/v1/models\",le=\"0.5\"} 2\n"
        "tollgate_request_duration_seconds_bucket{route=\"/v1/models\",le=\"1\"} 3\n"
        "tollgate_request_duration_seconds_bucket{route=\"/v1/models\",le=\"+Inf\"} 4\n"
        "tollgate_request_duration_seconds_sum{route=\"/v1/models\"} 2.9375\n"
        "tollgate_request_duration_seconds_count{route=\"/v1/models\"} 4\n"
        "# HELP tollgate_tokens_total Tokens generated.\n"
        "# TYPE tollgate_tokens_total counter\n"
        "tollgate_tokens_total 0\n"
        "# HELP tollgate_backend_up Whether a backend answers.\n"
        "# TYPE tollgate_backend_up gauge\n");

  tokens.labels({}).inc(100000);
  CHECK(registry.render().find("\ntollgate_tokens_total 100000\n") != std::string::npos);
}

TEST_CASE("a label-less histogram renders its empty buckets", "[metering][metrics]") {
  mt::Registry registry;
  registry.histogram("tollgate_ttft_seconds", "Time to first token.", {}, {0.5, 0.5, 1});
  CHECK(registry.render() ==
        "# HELP tollgate_ttft_seconds Time to first token.\n"
        "# TYPE tollgate_ttft_seconds histogram\n"
        "tollgate_ttft_seconds_bucket{le=\"0.5\"} 0\n"
        "tollgate_ttft_seconds_bucket{le=\"1\"} 0\n"
        "tollgate_ttft_seconds_bucket{le=\"+Inf\"} 0\n"
        "tollgate_ttft_seconds_sum 0\n"
        "tollgate_ttft_seconds_count 0\n");
}

TEST_CASE("label values and help text are escaped", "[metering][metrics]") {
  CHECK(mt::escape_label_value("plain") == "plain");
  CHECK(mt::escape_label_value("a\\b\"c\nd") == "a\\\\b\\\"c\\nd");

  mt::Registry registry;
  registry.counter("tollgate_odd_total", "Help with \\ and\nnewline \"quotes\".", {"model"})
      .labels({"llama \"3\"\\8b\n"})
      .inc();
  CHECK(registry.render() ==
        "# HELP tollgate_odd_total Help with \\\\ and\\nnewline \"quotes\".\n"
        "# TYPE tollgate_odd_total counter\n"
        "tollgate_odd_total{model=\"llama \\\"3\\\"\\\\8b\\n\"} 1\n");
}

TEST_CASE("sample values use Prometheus float syntax", "[metering][metrics]") {
  CHECK(mt::format_sample_value(0) == "0");
  CHECK(mt::format_sample_value(-0.0) == "0");
  CHECK(mt::format_sample_value(42) == "42");
  CHECK(mt::format_sample_value(-3) == "-3");
  CHECK(mt::format_sample_value(100000) == "100000");
  CHECK(mt::format_sample_value(1e15) == "1000000000000000");
  CHECK(mt::format_sample_value(0.25) == "0.25");
  CHECK(mt::format_sample_value(0.0001) == "0.0001");
  CHECK(mt::format_sample_value(0.1 + 0.2) == "0.30000000000000004");
  CHECK(mt::format_sample_value(1e21) == "1e+21");
  CHECK(mt::format_sample_value(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(mt::format_sample_value(-std::numeric_limits<double>::infinity()) == "-Inf");
  CHECK(mt::format_sample_value(std::numeric_limits<double>::quiet_NaN()) == "NaN");
}

TEST_CASE("histograms bucket by the first bound not below the value", "[metering][metrics]") {
  mt::Histogram h({0.5, 0.1, 1});
  CHECK(h.bounds() == std::vector<double>{0.1, 0.5, 1});
  for (double v : {-1.0, 0.1, 0.10001, 0.5, 1.0, 1.5}) h.observe(v);
  CHECK(h.cumulative_counts() == std::vector<std::uint64_t>{2, 4, 5, 6});
  CHECK(h.sum() == Approx(2.20001));

  const std::vector<double> buckets = mt::latency_buckets();
  CHECK(buckets.size() == 18);
  CHECK(buckets.front() == 0.0001);
  CHECK(buckets.back() == 60);
  CHECK(std::is_sorted(buckets.begin(), buckets.end()));
}

TEST_CASE("registration rejects bad names and duplicates", "[metering][metrics]") {
  mt::Registry registry;
  auto& family = registry.counter("tollgate_ok_total", "ok", {"a", "b"});
  CHECK_THROWS_AS(registry.gauge("tollgate_ok_total", "again"), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("9starts_with_digit", "x"), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("has-dash", "x"), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("", "x"), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("tollgate_x_total", "x", {"__reserved"}), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("tollgate_y_total", "x", {"has:colon"}), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("tollgate_z_total", "x", {"a", "a"}), std::invalid_argument);
  CHECK_THROWS_AS(registry.histogram("tollgate_h_seconds", "x", {"le"}, {1}), std::invalid_argument);
  CHECK_NOTHROW(registry.gauge("tollgate:recorded_ratio", "colons are fine in metric names"));

  CHECK_THROWS_AS(family.labels({"only one"}), std::invalid_argument);
  CHECK_THROWS_AS(family.labels(std::vector<std::string>{"1", "2", "3"}), std::invalid_argument);
  mt::Counter& c = family.labels({"1", "2"});
  CHECK(&c == &family.labels(std::vector<std::string>{"1", "2"}));
}

TEST_CASE("concurrent updates are not lost", "[metering][metrics]") {
  mt::Registry registry;
  mt::Counter& counter = registry.counter("tollgate_hits_total", "Hits.").labels({});
  mt::Gauge& gauge = registry.gauge("tollgate_level", "Level.").labels({});
  mt::Histogram& histogram = registry.histogram("tollgate_wait_seconds", "Wait.", {}, mt::latency_buckets()).labels({});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100'000; ++i) {
        counter.inc();
        gauge.add(0.5);
        histogram.observe(0.001);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(counter.value() == 400'000);
  CHECK(gauge.value() == 200'000);
  CHECK(histogram.cumulative_counts().back() == 400'000);
  CHECK(histogram.cumulative_counts()[3] == 400'000);  // le=0.001
  CHECK(histogram.cumulative_counts()[2] == 0);        // le=0.0005
}

TEST_CASE("the exposition passes promtool check metrics", "[metering][metrics]") {
  mt::Registry registry;
  registry.counter("tollgate_requests_total", "Requests handled.", {"route", "status"})
      .labels({"/v1/chat/completions", "200"})
      .inc(7);
  registry.counter("tollgate_prompt_tokens_total", "Prompt tokens counted.", {"model"});
  registry.gauge("tollgate_inflight_requests", "Requests in flight.").labels({}).set(2);
  registry.histogram("tollgate_request_duration_seconds", "Request latency.", {"route"}, mt::latency_buckets())
      .labels({"/v1/models"})
      .observe(0.003);
  registry.counter("tollgate_errors_total", "Errors with \"odd\" labels.", {"reason"})
      .labels({"bad \"json\"\\\n"})
      .inc();
  mt::add_process_collector(registry);

  const std::string text = registry.render();
  INFO(text);

  // The process collector reports plausible values for this very process.
  const double now_s = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  CHECK(sample(text, "process_resident_memory_bytes") > 1e5);
  CHECK(sample(text, "process_virtual_memory_bytes") >= sample(text, "process_resident_memory_bytes"));
  CHECK(sample(text, "process_open_fds") >= 3);
  CHECK(sample(text, "process_max_fds") >= sample(text, "process_open_fds"));
  CHECK(sample(text, "process_cpu_seconds_total") >= 0);
  CHECK(sample(text, "process_start_time_seconds") <= now_s + 1);
  CHECK(sample(text, "process_start_time_seconds") > now_s - 24 * 3600);
  CHECK(text.find("# TYPE process_cpu_seconds_total counter\n") != std::string::npos);

  const auto path =
      std::filesystem::temp_directory_path() / ("tollgate_metrics_" + std::to_string(::getpid()) + ".prom");
  {
    std::ofstream out(path, std::ios::binary);
    out << text;
    REQUIRE(out.good());
  }
  const auto [status, output] = run("promtool check metrics < '" + path.string() + "'");
  std::filesystem::remove(path);
  INFO("promtool output:\n" << output);
  REQUIRE(status == 0);
}
