// The real binary on PostgreSQL: keys made with the CLI, quotas admitted and
// restored after a restart, usage in the database, a revoked key refused.
#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <thread>

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

// Waits (bounded) until the database holds `want` usage rows.
bool wait_usage_rows(const std::string& url, std::int64_t want) {
  auto store = tollgate::metering::open_store(url);
  for (int i = 0; i < 100; ++i) {
    if (store->count_usage_events() == want) return true;
    std::this_thread::sleep_for(50ms);
  }
  return store->count_usage_events() == want;
}

}  // namespace

TEST_CASE("the gateway on PostgreSQL: keys, quotas across a restart, usage, revocation", "[postgres][e2e]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string key = create_key(url, "alice", {"--rpd", "3"});
  {
    GatewayProcess gw(dir, {kConfig, url, {}});
    HttpClient c(gw.port());
    for (int i = 0; i < 2; ++i) CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "one two")).status == 200);
    CHECK(c.post("/v1/chat/completions", "tg-not-a-key", chat_body("echo", "x")).status == 401);
    CHECK(gw.stop(SIGTERM) == 0);
  }
  CHECK(wait_usage_rows(url, 2));  // an unknown key's 401 writes no row
  auto usage = run_tollgate({"usage", "--db", url});
  CHECK(usage.exit_code == 0);
  CHECK(usage.out.find("alice") != std::string::npos);

  // The next start restores what alice used today from the database.
  GatewayProcess gw(dir, {kConfig, url, {}});
  HttpClient c(gw.port());
  CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "three")).status == 200);
  CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "four")).status == 429);

  // A key made and revoked by the CLI reaches the running gateway.
  const std::string bob = create_key(url, "bob");
  CHECK(c.post("/v1/chat/completions", bob, chat_body("echo", "hi")).status == 200);
  const auto revoked = run_tollgate({"keys", "revoke", bob.substr(0, 10), "--db", url});
  INFO(revoked.out << revoked.err);
  REQUIRE(revoked.exit_code == 0);
  int status = 0;
  for (int i = 0; i < 60 && status != 401; ++i) {
    status = c.post("/v1/chat/completions", bob, chat_body("echo", "hi")).status;
    if (status != 401) std::this_thread::sleep_for(50ms);
  }
  CHECK(status == 401);
}

TEST_CASE("migrate copies a SQLite installation into PostgreSQL: its keys work, its usage and jobs carry over",
          "[postgres][e2e]") {
  TempDir dir;
  const std::string file = dir.file("old.db");
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  // An installation with history: two users, a revoked key, limits, usage rows, a job.
  const std::string alice = create_key(file, "alice", {"--rpd", "5"});
  const std::string bob = create_key(file, "bob");
  {
    GatewayProcess gw(dir, {kConfig, file, {}});
    HttpClient c(gw.port());
    for (int i = 0; i < 3; ++i) CHECK(c.post("/v1/chat/completions", alice, chat_body("echo", "a b")).status == 200);
    CHECK(c.post("/v1/chat/completions", bob, chat_body("echo", "c")).status == 200);
    CHECK(gw.stop(SIGTERM) == 0);
  }
  REQUIRE(run_tollgate({"keys", "revoke", bob.substr(0, 10), "--db", file}).exit_code == 0);
  {
    auto old = tollgate::metering::open_store(file);
    tollgate::metering::JobRecord job;
    job.id = "job-carried";
    job.endpoint = "fast";
    job.user_id = old->find_user("alice")->id;
    job.request = "{}";
    job.created_at = 1;
    old->insert_job(job);
  }
  const auto usage_before = run_tollgate({"usage", "--by-model", "--db", file});
  const auto keys_before = run_tollgate({"keys", "list", "--db", file});

  const auto migrated = run_tollgate({"migrate", "--from", file, "--to", url});
  INFO(migrated.out << migrated.err);
  REQUIRE(migrated.exit_code == 0);
  CHECK(migrated.out.find("usage_events: 4 rows") != std::string::npos);
  CHECK(migrated.out.find("api_keys: 2 rows") != std::string::npos);

  // The same reports from the new database.
  CHECK(run_tollgate({"usage", "--by-model", "--db", url}).out == usage_before.out);
  CHECK(run_tollgate({"keys", "list", "--db", url}).out == keys_before.out);
  auto store = tollgate::metering::open_store(url);
  CHECK(store->find_job("job-carried"));
  // New rows continue after the copied ids.
  const std::string carol = create_key(url, "carol");
  CHECK(store->list_keys().back().id == 3);

  // The gateway on PostgreSQL honours the old keys, their state and what they used.
  GatewayProcess gw(dir, {kConfig, url, {}});
  HttpClient c(gw.port());
  CHECK(c.post("/v1/chat/completions", alice, chat_body("echo", "d")).status == 200);
  CHECK(c.post("/v1/chat/completions", alice, chat_body("echo", "e")).status == 200);
  CHECK(c.post("/v1/chat/completions", alice, chat_body("echo", "f")).status == 429);  // 5 a day
  CHECK(c.post("/v1/chat/completions", bob, chat_body("echo", "g")).status == 401);    // revoked
  CHECK(c.post("/v1/chat/completions", carol, chat_body("echo", "h")).status == 200);

  // A second copy into the same database is refused and changes nothing.
  const auto again = run_tollgate({"migrate", "--from", file, "--to", url});
  CHECK(again.exit_code != 0);
  CHECK(again.err.find("not empty") != std::string::npos);
}

TEST_CASE("PostgreSQL stopped and started again: cached keys keep working, no usage row is lost or doubled",
          "[postgres][e2e]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string key = create_key(url, "alice");
  GatewayProcess gw(dir, {kConfig, url, {}});
  HttpClient c(gw.port());
  int answered = 0;
  auto send = [&](int n) {
    for (int i = 0; i < n; ++i) {
      CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "x y")).status == 200);
      ++answered;
    }
  };
  send(20);
  tollgate::metering::test::stop_postgres();
  // The gateway never waits on the database on this path: the key is cached,
  // an unlimited key needs no quota, usage waits in memory.
  send(30);
  // The writer met the outage and kept the rows (bounded wait for its retry).
  bool retried = false;
  for (int i = 0; i < 100 && !retried; ++i) {
    retried = gw.log().find("will retry") != std::string::npos;
    if (!retried) std::this_thread::sleep_for(50ms);
  }
  CHECK(retried);
  send(5);
  CHECK(gw.running());
  tollgate::metering::test::start_postgres_again();
  send(20);
  CHECK(gw.stop(SIGTERM) == 0);  // a graceful stop writes what is queued
  CHECK(wait_usage_rows(url, answered));
  auto store = tollgate::metering::open_store(url);
  CHECK(store->count_usage_events() == answered);
  const auto rows = store->usage({});
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].requests == answered);  // the daily rollup agrees: nothing doubled
}

TEST_CASE("jobs on PostgreSQL: stored before they are acknowledged, run, and kept across a restart",
          "[postgres][e2e][jobs]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string config = std::string(kConfig) + R"(jobs:
  endpoints:
    - {name: fast, model: echo, max_concurrency: 4}
)";
  const std::string key = create_key(url, "alice");
  std::vector<std::string> ids;
  {
    GatewayProcess gw(dir, {config, url, {}});
    HttpClient c(gw.port());
    for (int i = 0; i < 5; ++i) {
      auto r = c.post("/v2/fast/run", key, R"({"input":{"prompt":"job )" + std::to_string(i) + R"("}})");
      REQUIRE(r.status == 200);
      ids.push_back(std::string(r.json().at("id").as_string()));
    }
    for (const auto& id : ids) {
      std::string state;
      for (int i = 0; i < 200 && state != "COMPLETED"; ++i) {
        state = std::string(c.get("/v2/fast/status/" + id, key).json().at("status").as_string());
        if (state != "COMPLETED") std::this_thread::sleep_for(20ms);
      }
      CHECK(state == "COMPLETED");
    }
    CHECK(gw.stop(SIGTERM) == 0);
  }
  auto store = tollgate::metering::open_store(url);
  for (const auto& id : ids) {
    auto job = store->find_job(id);
    REQUIRE(job);
    CHECK(job->state == tollgate::metering::JobState::completed);
    CHECK(job->output.find("job ") != std::string::npos);
  }
  // Another start serves the stored results.
  GatewayProcess gw(dir, {config, url, {}});
  HttpClient c(gw.port());
  auto r = c.get("/v2/fast/status/" + ids[2], key);
  REQUIRE(r.status == 200);
  CHECK(r.json().at("output").at("text").as_string() == "job 2");
}

TEST_CASE("usage past the in-memory bound, and at a stop with PostgreSQL away, waits in the spill file until it is back",
          "[postgres][e2e]") {
  const std::string url = tollgate::metering::test::fresh_postgres_database();
  TempDir dir;
  const std::string spill = dir.file("usage.spill");
  std::string config = kConfig;
  config.replace(0, config.find('\n'),
                 "metering: {flush_interval: 100ms, max_queued_rows: 10, spill_file: " + spill + "}");
  const std::string key = create_key(url, "alice");
  {
    GatewayProcess gw(dir, {config, url, {}});
    HttpClient c(gw.port());
    for (int i = 0; i < 5; ++i) CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "before")).status == 200);
    REQUIRE(wait_usage_rows(url, 5));

    tollgate::metering::test::stop_postgres();
    for (int i = 0; i < 40; ++i) CHECK(c.post("/v1/chat/completions", key, chat_body("echo", "away")).status == 200);
    bool spilled = false;
    for (int i = 0; i < 100 && !spilled; ++i) {
      spilled = c.get("/metrics").body.find("tollgate_metering_spill_rows 30") != std::string::npos;
      if (!spilled) std::this_thread::sleep_for(50ms);
    }
    CHECK(spilled);  // ten in memory, the rest on disk
    CHECK(gw.stop(SIGTERM) == 0);
    CHECK(gw.log().find("kept in " + spill) != std::string::npos);
  }
  // Every row the stop could not write is in the file: 10 from memory, 30 spilled before.
  std::ifstream in(spill);
  int lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  CHECK(lines == 40);

  tollgate::metering::test::start_postgres_again();
  GatewayProcess again(dir, {config, url, {}});
  CHECK(wait_usage_rows(url, 45));
  CHECK(again.stop(SIGTERM) == 0);
  auto store = tollgate::metering::open_store(url);
  CHECK(store->count_usage_events() == 45);
  const auto rows = store->usage({});
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].requests == 45);
  CHECK_FALSE(std::filesystem::exists(spill));
}
