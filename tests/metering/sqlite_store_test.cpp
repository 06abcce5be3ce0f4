#include <sqlite3.h>

#include <catch2/catch.hpp>

#include "metering/store.hpp"
#include "tests/metering/store_contract.hpp"
#include "tests/metering/temp_database.hpp"

using namespace tollgate::metering;
using namespace tollgate::metering::test;

namespace {

std::int64_t read_pragma(const std::string& path, const char* pragma) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, (std::string("PRAGMA ") + pragma).c_str(), -1, &stmt, nullptr) ==
          SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const std::int64_t value = sqlite3_column_int64(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return value;
}

void run_sql(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  REQUIRE(sqlite3_exec(db, sql, nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(db);
}

// The first column of the first row of `sql`, as text.
std::string read_text(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const auto* text = sqlite3_column_text(stmt, 0);
  std::string out = text ? reinterpret_cast<const char*>(text) : "";
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return out;
}

std::string read_journal_mode(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  std::string mode = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return mode;
}

}  // namespace

TEST_CASE("opening migrates to the latest user_version in WAL mode, and reopening is idempotent",
          "[metering][store]") {
  TempDatabase db;
  {
    auto store = open_sqlite_store(db.path());
    store->ensure_user("alice");
  }
  CHECK(read_pragma(db.path(), "user_version") == 5);
  CHECK(read_journal_mode(db.path()) == "wal");
  {
    auto store = open_sqlite_store(db.path());
    auto again = open_sqlite_store(db.path());
    CHECK(store->list_users().size() == 1);
    CHECK(again->find_user("alice").has_value());
  }
  CHECK(read_pragma(db.path(), "user_version") == 5);
}

TEST_CASE("a version-1 database keeps its usage rows and gets the single ts index", "[metering][store]") {
  TempDatabase db;
  const EpochMs now = k2024_03_15_102030;
  std::int64_t user = 0, key = 0;
  {
    auto store = open_sqlite_store(db.path());
    const ApiKey a = store->insert_key(new_key("alice", "tg-alice000", "ha"));
    user = a.user_id;
    key = a.id;
    store->append_usage(std::vector<UsageEvent>{event(now - 1000, a.user_id, a.id, "m", 200, 10, 5)});
  }
  // Back to version 1's schema, as a database written by an older build has it.
  run_sql(db.path(),
          "DROP TABLE jobs;"
          " DROP TABLE quota_budgets;"
          " ALTER TABLE usage_events DROP COLUMN request_id;"
          " DROP INDEX usage_events_ts;"
          " CREATE INDEX usage_events_user_ts ON usage_events(user_id, ts);"
          " CREATE INDEX usage_events_key_ts ON usage_events(key_id, ts);"
          " PRAGMA user_version = 1;");
  auto store = open_sqlite_store(db.path());
  CHECK(read_pragma(db.path(), "user_version") == 5);
  CHECK(read_text(db.path(), "SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_master"
                             " WHERE type = 'index' AND tbl_name = 'usage_events' ORDER BY name)") ==
        "usage_events_ts");
  CHECK(store->count_usage_events() == 1);
  const Store::QuotaState state = store->quota_state(now);
  CHECK(state.users.at(user).minute.tokens == 15);
  CHECK(state.keys.at(key).minute.requests == 1);
}

TEST_CASE("a batch of usage rows spanning several multi-row inserts is stored row for row", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  const ApiKey a = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  std::vector<UsageEvent> events;
  const int n = GENERATE(1, 31, 32, 33, 70);
  for (int i = 0; i < n; ++i) {
    auto e = event(k2024_03_15_102000 + i, a.user_id, a.id, "model-" + std::to_string(i), 200 + i, i, 2 * i);
    e.route = "/route/" + std::to_string(i);
    e.latency_us = 1000 + i;
    events.push_back(std::move(e));
  }
  store->append_usage(events);
  CHECK(store->count_usage_events() == n);
  // Every column of every row landed where it belongs.
  CHECK(read_text(db.path(),
                  "SELECT COUNT(*) FROM usage_events WHERE route = '/route/' || (ts - 1710498000000)"
                  " AND model = 'model-' || (ts - 1710498000000) AND status = 200 + ts - 1710498000000"
                  " AND prompt_tokens = ts - 1710498000000 AND completion_tokens = 2 * prompt_tokens"
                  " AND latency_us = 1000 + prompt_tokens AND backend = 'echo' AND counted = 1") ==
        std::to_string(n));
}

TEST_CASE("every text column of a usage row is cut to its bound, UTF-8 intact", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  const ApiKey a = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  // 1 MB strings of 3-byte characters after one ASCII byte.
  const std::string euro = "\xE2\x82\xAC";
  std::string huge = "x";
  while (huge.size() < 1'000'000) huge += euro;
  auto e = event(k2024_03_15_102000, a.user_id, a.id, huge, 404, 0, 0);
  e.backend = huge;
  e.route = huge;
  store->append_usage(std::span<const UsageEvent>(&e, 1));
  store->append_usage(std::span<const UsageEvent>(&e, 1));

  // 256 = 1 + 85 * 3 falls between two characters; 512 falls inside one, so 511 bytes stay.
  CHECK(read_text(db.path(), "SELECT MAX(length(CAST(model AS BLOB))) FROM usage_events") == "256");
  CHECK(read_text(db.path(), "SELECT MAX(length(CAST(backend AS BLOB))) FROM usage_events") == "256");
  CHECK(read_text(db.path(), "SELECT MAX(length(CAST(route AS BLOB))) FROM usage_events") == "511");
  CHECK(read_text(db.path(), "SELECT MAX(length(CAST(model AS BLOB))) FROM usage_daily") == "256");
  // The two rows roll up into one daily row under the cut name.
  CHECK(read_text(db.path(), "SELECT COUNT(*) FROM usage_daily") == "1");
  CHECK(read_text(db.path(), "SELECT requests FROM usage_daily") == "2");
  const std::string stored_route = read_text(db.path(), "SELECT route FROM usage_events LIMIT 1");
  CHECK(stored_route == huge.substr(0, 511));
}

TEST_CASE("a database from a newer schema is refused", "[metering][store]") {
  TempDatabase db;
  open_sqlite_store(db.path());
  sqlite3* raw = nullptr;
  REQUIRE(sqlite3_open(db.path().c_str(), &raw) == SQLITE_OK);
  REQUIRE(sqlite3_exec(raw, "PRAGMA user_version = 99", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(raw);
  CHECK_THROWS_WITH(open_sqlite_store(db.path()), Catch::Contains("newer"));
}

TEST_CASE("job states have RunPod's names both ways", "[metering][jobs]") {
  for (auto state : {JobState::in_queue, JobState::in_progress, JobState::completed, JobState::failed,
                     JobState::cancelled, JobState::timed_out}) {
    CHECK(parse_job_state(job_state_name(state)) == state);
  }
  CHECK(job_state_name(JobState::timed_out) == "TIMED_OUT");
  CHECK(job_state_name(JobState::in_queue) == "IN_QUEUE");
  CHECK_FALSE(parse_job_state("in_queue"));
  CHECK(job_state_final(JobState::cancelled));
  CHECK_FALSE(job_state_final(JobState::in_progress));
}
