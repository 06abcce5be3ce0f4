// Several replicas of the real binary on one PostgreSQL database: limits hold
// across them (shared budgets, docs/quotas.md), keys made on one work on the
// others, a replica killed mid-load costs no overshoot, and a database outage
// is served as configured and reported on /readyz.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "tests/e2e/harness.hpp"
#include "tests/metering/temp_postgres.hpp"

using namespace tollgate::test;

namespace {

const char* kConfig = R"(metering: {flush_interval: 100ms}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
)";

const std::string kAdminKey = "tg-admin-replicas-test-0123456789abcdef";

struct Replicas {
  Replicas(const TempDir& dir, const std::string& url, int n, const std::string& config = kConfig) {
    for (int i = 0; i < n; ++i) {
      gateways.push_back(std::make_unique<GatewayProcess>(
          dir, GatewayProcess::Options{config, url, {{"TOLLGATE_ADMIN_KEY", kAdminKey}}}));
    }
  }
  GatewayProcess& operator[](std::size_t i) { return *gateways[i]; }
  std::vector<std::unique_ptr<GatewayProcess>> gateways;
};

// Minute windows are real: a test counting one keeps clear of its end.
void early_in_a_minute() {
  const auto now = tollgate::metering::now_ms();
  const auto left = tollgate::metering::next_minute_start(now) - now;
  if (left < 25'000) std::this_thread::sleep_for(std::chrono::milliseconds(left + 200));
}

// `total` requests from `threads` clients at once, spread over the replicas
// round robin; `body_for(i)` is the i-th request's body. Statuses by request.
std::vector<int> burst(Replicas& replicas, const std::string& key, int total, int threads,
                       const std::function<std::string(int)>& body_for,
                       std::vector<HttpResponse>* responses = nullptr) {
  std::vector<int> statuses(static_cast<std::size_t>(total), 0);
  if (responses) responses->assign(static_cast<std::size_t>(total), HttpResponse{});
  std::atomic<int> next{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      std::vector<std::unique_ptr<HttpClient>> clients;
      for (auto& g : replicas.gateways) clients.push_back(std::make_unique<HttpClient>(g->port()));
      for (int i = next++; i < total; i = next++) {
        auto r = clients[static_cast<std::size_t>(i) % clients.size()]->post("/v1/chat/completions", key, body_for(i));
        statuses[static_cast<std::size_t>(i)] = r.status;
        if (responses) (*responses)[static_cast<std::size_t>(i)] = std::move(r);
      }
    });
  }
  for (auto& w : workers) w.join();
  return statuses;
}

std::string error_code(const HttpResponse& r) {
  try {
    return std::string(r.json().at("error").at("code").as_string());
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

TEST_CASE("three replicas admit exactly a key's limit between them: requests, and never past a token budget",
          "[postgres][e2e][replicas]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string requests_key = create_key(url, "alice", {"--rpm", "20"});
  const std::string tokens_key = create_key(url, "bob", {"--tpd", "340"});
  Replicas replicas(dir, url, 3);
  early_in_a_minute();

  auto statuses =
      burst(replicas, requests_key, 64, 16, [](int i) { return chat_body("echo", "n" + std::to_string(i)); });
  CHECK(std::count(statuses.begin(), statuses.end(), 200) == 20);
  CHECK(std::count(statuses.begin(), statuses.end(), 429) == 44);

  // Each request reserves its prompt and max_tokens, and this one uses both in
  // full (12 + 5 = 17 tokens): a budget of 20 such requests admits exactly 20.
  std::vector<HttpResponse> responses;
  const std::string body =
      R"({"model":"echo","max_tokens":5,"messages":[{"role":"user","content":"a b c d e f g h i j k l"}]})";
  burst(
      replicas, tokens_key, 64, 16, [&](int) { return body; }, &responses);
  std::int64_t used = 0;
  int admitted = 0;
  for (const auto& r : responses) {
    if (r.status != 200) {
      CHECK(r.status == 429);
      CHECK(error_code(r) == "rate_limit_exceeded");
      continue;
    }
    ++admitted;
    CHECK(r.json().at("usage").at("total_tokens").as_int64() == 17);
    used += r.json().at("usage").at("total_tokens").as_int64();
  }
  CHECK(admitted == 20);
  CHECK(used == 340);
}

TEST_CASE("a key made or revoked on one replica, or by the CLI, takes effect on the others at once (LISTEN/NOTIFY)",
          "[postgres][e2e][replicas]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  // The poll is a minute away: only the database's announcement can carry a revocation in time.
  std::string config = kConfig;
  config.replace(0, config.find('\n'), "metering: {flush_interval: 100ms, key_refresh_interval: 60s}");
  Replicas replicas(dir, url, 3, config);
  HttpClient admin(replicas[0].port());

  // Revoked through `revoke` (the admin API on replica 0, then the CLI), seen
  // by replicas 1 and 2 within a second.
  auto revoked_everywhere = [&](const std::string& key, const std::function<void()>& revoke) {
    for (std::size_t i = 1; i < 3; ++i) {
      HttpClient c(replicas[i].port());
      REQUIRE(c.post("/v1/chat/completions", key, chat_body("echo", "hi")).status == 200);
    }
    revoke();
    const auto revoked_at = std::chrono::steady_clock::now();
    for (std::size_t i = 1; i < 3; ++i) {
      HttpClient c(replicas[i].port());
      int status = 0;
      while (status != 401 && std::chrono::steady_clock::now() - revoked_at < 5s) {
        status = c.post("/v1/chat/completions", key, chat_body("echo", "hi")).status;
        if (status != 401) std::this_thread::sleep_for(20ms);
      }
      CHECK(status == 401);
    }
    CHECK(std::chrono::steady_clock::now() - revoked_at < 1s);
  };

  auto created = admin.post("/admin/keys", kAdminKey, R"({"user":"carol"})");
  REQUIRE(created.status == 201);
  const std::string key(created.json().at("key").as_string());
  const std::string prefix(created.json().at("prefix").as_string());
  revoked_everywhere(key,
                     [&] { REQUIRE(admin.post("/admin/keys/" + prefix + "/revoke", kAdminKey, "").status == 200); });

  const std::string cli_key = create_key(url, "dora");
  revoked_everywhere(cli_key, [&] {
    REQUIRE(run_tollgate({"keys", "revoke", cli_key.substr(0, 10), "--db", url}).exit_code == 0);
  });
}

TEST_CASE("a replica killed with -9 mid-load: the others keep serving and the limit is never exceeded",
          "[postgres][e2e][replicas]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string key = create_key(url, "dave", {"--rpd", "2000"});
  Replicas replicas(dir, url, 3);

  std::atomic<bool> killed{false};
  std::atomic<int> ok{0}, ok_after_kill{0}, refused{0}, other{0};
  std::thread killer([&] {
    // A quarter of the budget admitted: replica 2 holds a lease then, lost with it.
    for (int i = 0; i < 1000 && ok < 500; ++i) std::this_thread::sleep_for(5ms);
    ::kill(replicas[2].pid(), SIGKILL);
    killed = true;
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < 6; ++t) {
    workers.emplace_back([&, t] {
      auto replica = static_cast<std::size_t>(t % 3);
      HttpClient c(replicas[replica].port());
      for (int i = 0; i < 800; ++i) {
        if (replica == 2 && killed) break;  // its connection is gone with it
        HttpResponse r;
        try {
          r = c.post("/v1/chat/completions", key, chat_body("echo", "x"));
        } catch (const std::exception&) {
          if (replica == 2) break;  // killed under this request
          ++other;
          continue;
        }
        if (r.status == 200) {
          ++ok;
          if (killed) ++ok_after_kill;
        } else if (r.status == 429) {
          ++refused;
        } else if (replica != 2) {
          ++other;
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  killer.join();
  CHECK(ok.load() <= 2000);
  CHECK(ok_after_kill.load() > 0);
  CHECK(refused.load() > 0);  // 4 000 asked of 2 000
  CHECK(other.load() == 0);
  for (std::size_t i = 0; i < 2; ++i) CHECK(replicas[i].running());

  // What the survivors admitted is on record, and never more than the limit.
  for (std::size_t i = 0; i < 2; ++i) CHECK(replicas[i].stop(SIGTERM) == 0);
  auto store = tollgate::metering::open_store(url);
  const auto rows = store->usage({});
  std::int64_t requests = 0;
  for (const auto& row : rows) requests += row.requests - row.errors;
  CHECK(requests <= 2000);
}

TEST_CASE(
    "PostgreSQL down: limited keys use up their leases, then get a 503 (or are admitted, failing open); "
    "/readyz says why; all recovers",
    "[postgres][e2e][replicas]") {
  const bool fail_open = GENERATE(false, true);
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string limited = create_key(url, "erin", {"--rpd", "100000"});
  const std::string unlimited = create_key(url, "frank");
  // The lease stays with the replica while PostgreSQL stops (no idle return).
  std::string config = kConfig;
  config.replace(0, config.find('\n'),
                 std::string("metering: {flush_interval: 100ms, lease_idle_return: 60s, quota_fail_open: ") +
                     (fail_open ? "true" : "false") + "}");
  Replicas replicas(dir, url, 1, config);
  HttpClient c(replicas[0].port());
  REQUIRE(c.post("/v1/chat/completions", limited, chat_body("echo", "x")).status == 200);  // claims a lease
  CHECK(c.get("/readyz").body == R"({"status":"ok","database":"ok"})");

  tollgate::metering::test::stop_postgres();
  int served = 0, unavailable = 0;
  HttpResponse refusal;
  for (int i = 0; i < 8'000 && unavailable == 0; ++i) {
    auto r = c.post("/v1/chat/completions", limited, chat_body("echo", "x"));
    if (r.status == 200) {
      ++served;
    } else {
      REQUIRE(r.status == 503);
      ++unavailable;
      refusal = std::move(r);
    }
    if (fail_open && served >= 7'000) break;
  }
  if (fail_open) {
    CHECK(unavailable == 0);
  } else {
    // The lease it held (a sixteenth of the day's budget) served, then a clear 503.
    CHECK(served >= 6'000);
    CHECK(served <= 6'300);
    CHECK(unavailable == 1);
    CHECK(error_code(refusal) == "quota_unavailable");
    CHECK(!refusal.header("retry-after").empty());
  }
  CHECK(c.post("/v1/chat/completions", unlimited, chat_body("echo", "y")).status == 200);
  auto ready = c.get("/readyz");
  CHECK(ready.status == 200);
  INFO(ready.body);
  auto ready_json = ready.json();
  CHECK(ready_json.at("status") == "degraded");
  CHECK(ready_json.at("database") == "unreachable");
  CHECK(ready_json.at("limited_keys") == (fail_open ? "admitted past their leases" : "refused past their leases"));

  tollgate::metering::test::start_postgres_again();
  int status = 0;
  std::string readiness;
  for (int i = 0; i < 100 && (status != 200 || readiness != R"({"status":"ok","database":"ok"})"); ++i) {
    std::this_thread::sleep_for(100ms);
    status = c.post("/v1/chat/completions", limited, chat_body("echo", "x")).status;
    readiness = c.get("/readyz").body;
  }
  CHECK(status == 200);
  CHECK(readiness == R"({"status":"ok","database":"ok"})");
}
