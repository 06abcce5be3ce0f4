// The serverless-style job API (/v2/{endpoint}/...) through the real binary:
// the lifecycle, runsync's wait, streaming a running job, cancel, retry,
// ownership, bad input, signed webhooks to a receiver on loopback, restarts
// after kill -9, TTL purge and quotas.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

// Two echo backends: one answers at once, one spends 100 ms on each word.
// Endpoints: fast; slow (one at a time, an interrupted job fails); slowrq (the
// same, but an interrupted job runs again).
std::string jobs_config(const std::string& webhook = "{allow_private: true, secret: whsec-test, first_backoff: 50ms}") {
  return R"(metering: {flush_interval: 100ms}
limits: {shutdown_grace: 1s}
backends:
  - {name: echo, type: echo}
  - {name: slow, type: echo, token_delay: 100ms}
models:
  - name: echo
    deployments: [{backend: echo}]
  - name: slow
    deployments: [{backend: slow}]
jobs:
  runsync_wait: 5s
  stream_wait: 300ms
  purge_interval: 200ms
  webhook: )" + webhook + R"(
  endpoints:
    - {name: fast, model: echo, max_concurrency: 4}
    - {name: slow, model: slow, max_concurrency: 1}
    - {name: slowrq, model: slow, max_concurrency: 1, on_interrupt: requeue}
)";
}

std::string words(int n) {
  std::string text;
  for (int i = 0; i < n; ++i) text += (i ? " w" : "w") + std::to_string(i);
  return text;
}

std::string prompt_job(const std::string& prompt, const std::string& extra = "") {
  return R"({"input":{"prompt":")" + prompt + R"("})" + extra + "}";
}

json::object status_of(std::uint16_t port, const std::string& key, const std::string& endpoint, const std::string& id) {
  HttpClient c(port);
  auto r = c.get("/v2/" + endpoint + "/status/" + id, key);
  REQUIRE(r.status == 200);
  return r.json().as_object();
}

std::string state_of(const json::object& job) { return std::string(job.at("status").as_string()); }

bool final_state(const std::string& s) { return s != "IN_QUEUE" && s != "IN_PROGRESS"; }

// Polls /status until the job reaches a final state (bounded).
json::object wait_final(std::uint16_t port, const std::string& key, const std::string& endpoint,
                        const std::string& id, std::chrono::milliseconds limit = 15s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    auto job = status_of(port, key, endpoint, id);
    if (final_state(state_of(job)) || std::chrono::steady_clock::now() > deadline) return job;
    std::this_thread::sleep_for(20ms);
  }
}

// Polls /status until the job is in `state` (bounded); whether it got there.
bool wait_state(std::uint16_t port, const std::string& key, const std::string& endpoint, const std::string& id,
                const std::string& state, std::chrono::milliseconds limit = 10s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (state_of(status_of(port, key, endpoint, id)) == state) return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

std::string submit(std::uint16_t port, const std::string& key, const std::string& endpoint, const std::string& body) {
  HttpClient c(port);
  auto r = c.post("/v2/" + endpoint + "/run", key, body);
  REQUIRE(r.status == 200);
  auto j = r.json().as_object();
  CHECK(state_of(j) == "IN_QUEUE");
  return std::string(j.at("id").as_string());
}

std::string error_code(const HttpResponse& r) {
  auto e = r.json().as_object().at("error").as_object();
  return e.at("code").is_string() ? std::string(e.at("code").as_string()) : "";
}

// Waits (bounded) until `sql` counts `want` rows.
bool wait_count(const std::string& db, const std::string& sql, std::int64_t want, std::chrono::milliseconds limit = 5s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (sql_int(db, sql) == want) return true;
    std::this_thread::sleep_for(20ms);
  }
  return sql_int(db, sql) == want;
}

std::string metrics(std::uint16_t port) {
  HttpClient c(port);
  return c.get("/metrics").body;
}

// A webhook receiver on 127.0.0.1: records each request and answers 200.
class WebhookReceiver {
 public:
  struct Delivery {
    std::string head;  // request line and headers, lower-cased names kept as sent
    std::string body;
  };

  WebhookReceiver() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~WebhookReceiver() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }

  std::uint16_t port() const { return port_; }
  int connections() const { return connections_.load(); }
  std::vector<Delivery> deliveries() {
    std::lock_guard lock(mutex_);
    return deliveries_;
  }
  bool wait_for(std::size_t n, std::chrono::milliseconds limit = 10s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (deliveries().size() >= n) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }

 private:
  void serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      ++connections_;
      std::string data;
      char buf[4096];
      // Headers, then Content-Length bytes of body (bounded by time and size).
      auto deadline = std::chrono::steady_clock::now() + 5s;
      std::size_t need = std::string::npos;
      while (std::chrono::steady_clock::now() < deadline && data.size() < (1 << 20)) {
        pollfd q{c, POLLIN, 0};
        if (::poll(&q, 1, 50) <= 0) continue;
        auto n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        data.append(buf, static_cast<std::size_t>(n));
        auto end = data.find("\r\n\r\n");
        if (end != std::string::npos && need == std::string::npos) {
          auto lower = data.substr(0, end);
          for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
          auto cl = lower.find("content-length:");
          need = end + 4 + (cl == std::string::npos ? 0 : std::stoul(lower.substr(cl + 15)));
        }
        if (need != std::string::npos && data.size() >= need) break;
      }
      auto end = data.find("\r\n\r\n");
      if (end != std::string::npos) {
        std::lock_guard lock(mutex_);
        deliveries_.push_back({data.substr(0, end), data.substr(end + 4)});
      }
      const char* ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      ::send(c, ok, std::strlen(ok), MSG_NOSIGNAL);
      ::close(c);
    }
  }

  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::mutex mutex_;
  std::vector<Delivery> deliveries_;
  std::thread thread_;
};

// A header's value from a raw head (case-insensitive name).
std::string header_value(const std::string& head, std::string name) {
  for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  std::size_t pos = 0;
  while (pos < head.size()) {
    auto end = head.find("\r\n", pos);
    if (end == std::string::npos) end = head.size();
    auto line = head.substr(pos, end - pos);
    auto colon = line.find(':');
    if (colon != std::string::npos) {
      auto n = line.substr(0, colon);
      for (auto& ch : n) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (n == name) {
        auto v = line.substr(colon + 1);
        while (!v.empty() && v.front() == ' ') v.erase(v.begin());
        return v;
      }
    }
    pos = end + 2;
  }
  return "";
}

std::string hmac_sha256_hex(const std::string& key, const std::string& data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
       data.size(), out, &len);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) {
    s += hex[out[i] >> 4];
    s += hex[out[i] & 15];
  }
  return s;
}

}  // namespace

TEST_CASE("a job runs to COMPLETED through /run, /status and /runsync, metered once with its tokens",
          "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  auto id = submit(gw.port(), key, "fast", prompt_job("alpha beta gamma"));
  CHECK(id.rfind("job-", 0) == 0);
  auto job = wait_final(gw.port(), key, "fast", id);
  REQUIRE(state_of(job) == "COMPLETED");
  CHECK(job.at("id").as_string() == id);
  CHECK(job.at("delayTime").as_int64() >= 0);
  CHECK(job.at("executionTime").as_int64() >= 0);
  auto& out = job.at("output").as_object();
  CHECK(out.at("text").as_string() == "alpha beta gamma");
  CHECK(out.at("finish_reason").as_string() == "stop");
  CHECK(out.at("usage").at("prompt_tokens").as_int64() == 3);
  CHECK(out.at("usage").at("completion_tokens").as_int64() == 3);

  HttpClient c(gw.port());
  auto sync = c.post("/v2/fast/runsync", key,
                     R"({"input":{"messages":[{"role":"user","content":"one two three four five"}],)"
                     R"("sampling_params":{"max_tokens":2,"temperature":0}}})");
  REQUIRE(sync.status == 200);
  auto s = sync.json().as_object();
  CHECK(state_of(s) == "COMPLETED");
  CHECK(s.at("output").at("text").as_string() == "one two");
  CHECK(s.at("output").at("finish_reason").as_string() == "length");

  // One counted row per job with its tokens; looking at jobs writes none.
  CHECK(wait_count(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run'", 2));
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run' AND counted = 1 AND status = 200") ==
        2);
  CHECK(sql_int(gw.db(), "SELECT SUM(completion_tokens) FROM usage_events WHERE route = '/v2/run'") == 5);
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2'") == 0);
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM jobs WHERE state = 'COMPLETED'") == 2);
  CHECK(sql_rows(gw.db(), "SELECT output FROM jobs WHERE id = '" + id + "'")[0][0].find("alpha beta gamma") !=
        std::string::npos);

  auto health = c.get("/v2/fast/health", key);
  REQUIRE(health.status == 200);
  CHECK(health.json().at("jobs").at("completed").as_int64() == 2);
  CHECK(health.json().at("jobs").at("inQueue").as_int64() == 0);
  auto m = metrics(gw.port());
  CHECK(m.find(R"(tollgate_jobs_total{endpoint="fast",state="COMPLETED"} 2)") != std::string::npos);
  CHECK(m.find(R"(tollgate_jobs_total{endpoint="fast",state="IN_QUEUE"} 2)") != std::string::npos);
  CHECK(m.find(R"(tollgate_jobs{endpoint="fast",state="IN_QUEUE"} 0)") != std::string::npos);
  CHECK(m.find(R"(tollgate_jobs{endpoint="fast",state="IN_PROGRESS"} 0)") != std::string::npos);
  CHECK(m.find(R"(tollgate_job_queue_wait_seconds_count{endpoint="fast"} 2)") != std::string::npos);
  CHECK(m.find(R"(tollgate_job_execution_seconds_count{endpoint="fast"} 2)") != std::string::npos);
  auto [code, output] = promtool_check(dir, m);
  INFO(output);
  CHECK(code == 0);
}

TEST_CASE("runsync that outlasts its wait answers the id and status, and /status follows the job to its end",
          "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient c(gw.port());
  auto r = c.post("/v2/slow/runsync?wait=200", key, prompt_job(words(10)));
  REQUIRE(r.status == 200);
  auto j = r.json().as_object();
  CHECK_FALSE(final_state(state_of(j)));
  std::string id(j.at("id").as_string());
  auto done = wait_final(gw.port(), key, "slow", id);
  REQUIRE(state_of(done) == "COMPLETED");
  CHECK(done.at("output").at("text").as_string() == words(10));
}

TEST_CASE("/stream returns a running job's output as it is produced, each piece once", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto id = submit(gw.port(), key, "slow", R"({"input":{"prompt":")" + words(12) + R"(","stream":true}})");
  std::string text;
  int calls_with_output_while_running = 0;
  json::object last;
  std::string state = "IN_QUEUE";
  HttpClient c(gw.port());
  for (int i = 0; i < 100 && !final_state(state); ++i) {
    auto r = c.get("/v2/slow/stream/" + id, key);
    REQUIRE(r.status == 200);
    auto body = r.json().as_object();
    state = state_of(body);
    for (auto& item : body.at("stream").as_array()) {
      auto& o = item.at("output").as_object();
      text += std::string(o.at("text").as_string());
      if (o.contains("usage")) last = o;
    }
    if (!final_state(state) && !body.at("stream").as_array().empty()) ++calls_with_output_while_running;
  }
  CHECK(state == "COMPLETED");
  CHECK(text == words(12));
  CHECK(calls_with_output_while_running >= 2);
  REQUIRE(last.contains("usage"));
  CHECK(last.at("usage").at("completion_tokens").as_int64() == 12);
  CHECK(last.at("finish_reason").as_string() == "stop");
  auto again = c.get("/v2/slow/stream/" + id, key);
  CHECK(again.json().at("stream").as_array().empty());
}

TEST_CASE("cancel ends a queued job at once and a running one when its backend stops, each metered once",
          "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto running = submit(gw.port(), key, "slow", prompt_job(words(40)));
  auto queued = submit(gw.port(), key, "slow", prompt_job(words(3)));
  REQUIRE(wait_state(gw.port(), key, "slow", running, "IN_PROGRESS"));
  CHECK(state_of(status_of(gw.port(), key, "slow", queued)) == "IN_QUEUE");

  HttpClient c(gw.port());
  auto r1 = c.post("/v2/slow/cancel/" + queued, key, "");
  REQUIRE(r1.status == 200);
  CHECK(state_of(r1.json().as_object()) == "CANCELLED");
  auto t0 = std::chrono::steady_clock::now();
  auto r2 = c.post("/v2/slow/cancel/" + running, key, "");
  REQUIRE(r2.status == 200);
  CHECK(state_of(r2.json().as_object()) == "CANCELLED");
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);  // not the 4 s the job would have run
  auto health = c.get("/v2/slow/health", key).json();
  CHECK(health.at("jobs").at("cancelled").as_int64() == 2);
  CHECK(health.at("jobs").at("inProgress").as_int64() == 0);
  CHECK(health.at("jobs").at("inQueue").as_int64() == 0);
  // A cancelled job stays cancelled.
  auto r3 = c.post("/v2/slow/cancel/" + queued, key, "");
  CHECK(state_of(r3.json().as_object()) == "CANCELLED");
  CHECK(wait_count(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run' AND status = 499", 2));
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM jobs WHERE state = 'CANCELLED'") == 2);
}

TEST_CASE("a user sees, streams, cancels and retries only their own jobs", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto alice = create_key(gw.db(), "alice");
  auto bob = create_key(gw.db(), "bob");
  auto alice2 = create_key(gw.db(), "alice");  // another key of the same user
  wait_for_key(gw.port(), alice);
  wait_for_key(gw.port(), bob);
  auto id = submit(gw.port(), alice, "slow", prompt_job(words(20)));
  HttpClient c(gw.port());
  for (auto [method, path] : std::vector<std::pair<std::string, std::string>>{{"GET", "/v2/slow/status/"},
                                                                             {"GET", "/v2/slow/stream/"},
                                                                             {"POST", "/v2/slow/cancel/"},
                                                                             {"POST", "/v2/slow/retry/"}}) {
    auto r = c.request(method, path + id, "", {{"Authorization", "Bearer " + bob}});
    INFO(method << " " << path);
    CHECK(r.status == 404);
    CHECK(error_code(r) == "job_not_found");
  }
  // The right user on the wrong endpoint does not find it either.
  auto wrong = c.get("/v2/fast/status/" + id, alice);
  CHECK(wrong.status == 404);
  CHECK(c.get("/v2/slow/status/" + id, alice2).status == 200);
  CHECK(state_of(status_of(gw.port(), alice, "slow", id)) != "CANCELLED");
  c.post("/v2/slow/cancel/" + id, alice, "");
}

TEST_CASE("bad job requests get OpenAI-style errors and create no job", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice", {"--models", "slow"});
  auto all = create_key(gw.db(), "bob");
  wait_for_key(gw.port(), key);
  HttpClient c(gw.port());
  struct Case {
    std::string target, body;
    int status;
    std::string code;
  };
  std::vector<Case> cases{
      {"/v2/slow/run", "not json", 400, "invalid_value"},
      {"/v2/slow/run", "{}", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":"hello"})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a","messages":[{"role":"user","content":"b"}]}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a","sampling_params":{"max_tokenz":3}}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a","sampling_params":{"temperature":"hot"}}})", 400, ""},
      {"/v2/slow/run", R"({"input":{"prompt":"a","sampling_params":{"max_tokens":-1}}})", 400, ""},
      {"/v2/slow/run", R"({"input":{"prompt":"a","colour":"red"}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a"},"policy":{"ttl":5}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a"},"policy":{"priority":1}})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a"},"webhook":"ftp://127.0.0.1/x"})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a"},"webhook":"http://user:pw@127.0.0.1/x"})", 400, "invalid_value"},
      {"/v2/slow/run", R"({"input":{"prompt":"a"},"webhook":42})", 400, "invalid_value"},
      {"/v2/nope/run", R"({"input":{"prompt":"a"}})", 404, "endpoint_not_found"},
      {"/v2/slow/dance", R"({"input":{"prompt":"a"}})", 404, "unknown_route"},
      {"/v2/slow/status", "", 404, "unknown_route"},
      {"/v2/slow/status/a/b", "", 404, "unknown_route"},
      {"/v2/slow/status/..%2f..", "", 404, "job_not_found"},
      {"/v2/fast/run", R"({"input":{"prompt":"a"}})", 403, "model_not_allowed"},
  };
  for (const auto& k : cases) {
    INFO(k.target << " " << k.body);
    auto r = c.post(k.target, key, k.body);
    CHECK(r.status == k.status);
    auto err = r.json().as_object().at("error").as_object();
    CHECK(!err.at("message").as_string().empty());
    if (!k.code.empty()) CHECK(error_code(r) == k.code);
  }
  CHECK(c.get("/v2/slow/run", key).status == 405);
  CHECK(c.request("DELETE", "/v2/slow/status/job-1", "", {{"Authorization", "Bearer " + key}}).status == 405);
  CHECK(c.post("/v2/slow/run", "", prompt_job("a")).status == 401);
  CHECK(c.post("/v2/slow/run", "tg-not-a-key", prompt_job("a")).status == 401);
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM jobs") == 0);
  // A good one afterwards still works on the same connection.
  auto ok = c.post("/v2/slow/run", all, prompt_job("fine"));
  CHECK(ok.status == 200);
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM jobs") == 1);
}

TEST_CASE("a job's end is POSTed to its webhook, signed so the receiver can verify it", "[e2e][jobs][webhook]") {
  WebhookReceiver receiver;
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto hook = "http://127.0.0.1:" + std::to_string(receiver.port()) + "/hook";
  auto id = submit(gw.port(), key, "fast", prompt_job("signed and delivered", R"(,"webhook":")" + hook + "\""));
  REQUIRE(receiver.wait_for(1));
  auto d = receiver.deliveries().front();
  CHECK(d.head.rfind("POST /hook HTTP/1.1", 0) == 0);
  CHECK(header_value(d.head, "Tollgate-Webhook-Id") == id);
  CHECK(header_value(d.head, "Content-Type").find("application/json") == 0);
  auto signature = header_value(d.head, "Tollgate-Signature");
  REQUIRE(signature.rfind("t=", 0) == 0);
  auto comma = signature.find(",v1=");
  REQUIRE(comma != std::string::npos);
  auto t = signature.substr(2, comma - 2);
  CHECK(std::abs(std::stoll(t) - static_cast<long long>(time(nullptr))) < 60);
  CHECK(signature.substr(comma + 4) == hmac_sha256_hex("whsec-test", t + "." + d.body));
  CHECK(signature.substr(comma + 4) != hmac_sha256_hex("another secret", t + "." + d.body));
  auto body = json::parse(d.body).as_object();
  CHECK(body.at("id").as_string() == id);
  CHECK(state_of(body) == "COMPLETED");
  CHECK(body.at("output").at("text").as_string() == "signed and delivered");
  bool counted = false;
  for (int i = 0; i < 100 && !counted; ++i) {
    counted = metrics(gw.port()).find(R"(tollgate_job_webhooks_total{result="delivered"} 1)") != std::string::npos;
    if (!counted) std::this_thread::sleep_for(20ms);
  }
  CHECK(counted);
}

TEST_CASE("a webhook to a loopback or private address is refused unless the config allows it",
          "[e2e][jobs][webhook]") {
  WebhookReceiver receiver;
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config("{secret: s, max_attempts: 2, first_backoff: 10ms}"), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto hook = "http://127.0.0.1:" + std::to_string(receiver.port()) + "/hook";
  auto id = submit(gw.port(), key, "fast", prompt_job("not for you", R"(,"webhook":")" + hook + "\""));
  CHECK(state_of(wait_final(gw.port(), key, "fast", id)) == "COMPLETED");
  bool failed = false;
  for (int i = 0; i < 200 && !failed; ++i) {
    failed = metrics(gw.port()).find(R"(tollgate_job_webhooks_total{result="failed"} 1)") != std::string::npos;
    if (!failed) std::this_thread::sleep_for(20ms);
  }
  CHECK(failed);
  CHECK(receiver.connections() == 0);
}

TEST_CASE("kill -9 loses no accepted job: queued ones run after the restart, an interrupted one as configured",
          "[e2e][jobs]") {
  TempDir dir;
  std::string db = dir.file("jobs.db");
  std::string key;
  std::vector<std::string> fails, requeues;
  {
    GatewayProcess gw(dir, {jobs_config(), db, {}});
    key = create_key(db, "alice");
    wait_for_key(gw.port(), key);
    for (int i = 0; i < 3; ++i) {
      fails.push_back(submit(gw.port(), key, "slow", prompt_job(words(8))));
      requeues.push_back(submit(gw.port(), key, "slowrq", prompt_job(words(8))));
    }
    REQUIRE(wait_state(gw.port(), key, "slow", fails[0], "IN_PROGRESS"));
    REQUIRE(wait_state(gw.port(), key, "slowrq", requeues[0], "IN_PROGRESS"));
    std::this_thread::sleep_for(150ms);
    CHECK(gw.stop(SIGKILL) == 128 + SIGKILL);
  }
  CHECK(sql_int(db, "SELECT COUNT(*) FROM jobs") == 6);
  GatewayProcess again(dir, {jobs_config(), db, {}});
  auto first = wait_final(again.port(), key, "slow", fails[0]);
  CHECK(state_of(first) == "FAILED");
  CHECK(std::string(first.at("error").as_string()).find("stopped") != std::string::npos);
  for (std::size_t i = 1; i < fails.size(); ++i) {
    auto j = wait_final(again.port(), key, "slow", fails[i]);
    CHECK(state_of(j) == "COMPLETED");
    CHECK(j.at("output").at("text").as_string() == words(8));
  }
  for (const auto& id : requeues) {
    auto j = wait_final(again.port(), key, "slowrq", id);
    CHECK(state_of(j) == "COMPLETED");
    CHECK(j.at("output").at("text").as_string() == words(8));
  }
  CHECK(sql_int(db, "SELECT attempts FROM jobs WHERE id = '" + requeues[0] + "'") == 2);
}

TEST_CASE("a graceful stop keeps queued jobs, and the next start runs them", "[e2e][jobs]") {
  TempDir dir;
  std::string db = dir.file("jobs.db");
  std::string key;
  std::vector<std::string> ids;
  {
    GatewayProcess gw(dir, {jobs_config(), db, {}});
    key = create_key(db, "alice");
    wait_for_key(gw.port(), key);
    for (int i = 0; i < 3; ++i) ids.push_back(submit(gw.port(), key, "slow", prompt_job(words(3))));
    CHECK(gw.stop(SIGTERM) == 0);
  }
  CHECK(sql_int(db, "SELECT COUNT(*) FROM jobs WHERE state IN ('IN_QUEUE', 'COMPLETED')") == 3);
  GatewayProcess again(dir, {jobs_config(), db, {}});
  for (const auto& id : ids) CHECK(state_of(wait_final(again.port(), key, "slow", id)) == "COMPLETED");
  CHECK(wait_count(db, "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run' AND status = 200", 3));
}

TEST_CASE("a finished job's result is purged after its TTL", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto id = submit(gw.port(), key, "fast", prompt_job("short lived", R"(,"policy":{"ttl":1000})"));
  auto keep = submit(gw.port(), key, "fast", prompt_job("kept"));
  CHECK(state_of(wait_final(gw.port(), key, "fast", id)) == "COMPLETED");
  CHECK(state_of(wait_final(gw.port(), key, "fast", keep)) == "COMPLETED");
  CHECK(wait_count(gw.db(), "SELECT COUNT(*) FROM jobs WHERE id = '" + id + "'", 0, 5s));
  HttpClient c(gw.port());
  CHECK(c.get("/v2/fast/status/" + id, key).status == 404);
  CHECK(c.get("/v2/fast/status/" + keep, key).status == 200);
}

TEST_CASE("a job past its execution timeout is TIMED_OUT, and retry runs it again", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  auto id = submit(gw.port(), key, "slow", prompt_job(words(30), R"(,"policy":{"executionTimeout":1000})"));
  auto job = wait_final(gw.port(), key, "slow", id);
  CHECK(state_of(job) == "TIMED_OUT");
  CHECK(job.at("executionTime").as_int64() < 2500);
  HttpClient c(gw.port());
  auto retried = c.post("/v2/slow/retry/" + id, key, "");
  REQUIRE(retried.status == 200);
  CHECK_FALSE(final_state(state_of(retried.json().as_object())));
  CHECK(state_of(wait_final(gw.port(), key, "slow", id)) == "TIMED_OUT");
  CHECK(sql_int(gw.db(), "SELECT attempts FROM jobs WHERE id = '" + id + "'") == 2);
  CHECK(wait_count(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run' AND status = 504", 2));
  // Only a failed or timed-out job may run again.
  auto done = submit(gw.port(), key, "fast", prompt_job("done"));
  CHECK(state_of(wait_final(gw.port(), key, "fast", done)) == "COMPLETED");
  auto refused = c.post("/v2/fast/retry/" + done, key, "");
  CHECK(refused.status == 400);
  CHECK(error_code(refused) == "job_not_retryable");
}

TEST_CASE("jobs count against the caller's request quota, and looking at them does not", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  // No wait_for_key: its probe would spend a request. A key unknown to the
  // running gateway is looked up before it is refused.
  auto key = create_key(gw.db(), "alice", {"--rpm", "3"});
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(submit(gw.port(), key, "fast", prompt_job("q")));
  HttpClient c(gw.port());
  auto refused = c.post("/v2/fast/run", key, prompt_job("q"));
  CHECK(refused.status == 429);
  CHECK(!refused.header("retry-after").empty());
  for (int i = 0; i < 5; ++i) CHECK(c.get("/v2/fast/status/" + ids[0], key).status == 200);
  CHECK(sql_int(gw.db(), "SELECT COUNT(*) FROM jobs") == 3);
  CHECK(wait_count(gw.db(), "SELECT COUNT(*) FROM usage_events WHERE route = '/v2/run' AND counted = 1", 3));
}

TEST_CASE("purge-queue cancels the caller's queued jobs and no one else's", "[e2e][jobs]") {
  TempDir dir;
  GatewayProcess gw(dir, {jobs_config(), "", {}});
  auto alice = create_key(gw.db(), "alice");
  auto bob = create_key(gw.db(), "bob");
  wait_for_key(gw.port(), alice);
  wait_for_key(gw.port(), bob);
  auto running = submit(gw.port(), alice, "slow", prompt_job(words(20)));
  REQUIRE(wait_state(gw.port(), alice, "slow", running, "IN_PROGRESS"));
  auto a1 = submit(gw.port(), alice, "slow", prompt_job("a"));
  auto a2 = submit(gw.port(), alice, "slow", prompt_job("b"));
  auto b1 = submit(gw.port(), bob, "slow", prompt_job("c"));
  HttpClient c(gw.port());
  auto r = c.post("/v2/slow/purge-queue", alice, "");
  REQUIRE(r.status == 200);
  CHECK(r.json().at("removed").as_int64() == 2);
  CHECK(state_of(status_of(gw.port(), alice, "slow", a1)) == "CANCELLED");
  CHECK(state_of(status_of(gw.port(), alice, "slow", a2)) == "CANCELLED");
  CHECK(state_of(status_of(gw.port(), bob, "slow", b1)) == "IN_QUEUE");
  CHECK(state_of(status_of(gw.port(), alice, "slow", running)) == "IN_PROGRESS");
  c.post("/v2/slow/cancel/" + running, alice, "");
  CHECK(state_of(wait_final(gw.port(), bob, "slow", b1)) == "COMPLETED");
}
