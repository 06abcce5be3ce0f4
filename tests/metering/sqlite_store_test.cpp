#include <sqlite3.h>

#include <catch2/catch.hpp>

#include "metering/store.hpp"
#include "tests/metering/temp_database.hpp"

using namespace tollgate::metering;
using tollgate::metering::test::TempDatabase;

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

UsageQuery usage_query(std::optional<std::string> user, std::optional<EpochMs> since, bool by_day,
                       bool by_model) {
  UsageQuery query;
  query.user = std::move(user);
  query.since = since;
  query.by_day = by_day;
  query.by_model = by_model;
  return query;
}

NewKey new_key(std::string user, std::string prefix, std::string hash) {
  NewKey key;
  key.user_name = std::move(user);
  key.prefix = std::move(prefix);
  key.sha256_hex = std::move(hash);
  return key;
}

UsageEvent event(EpochMs ts, std::optional<std::int64_t> user, std::optional<std::int64_t> key,
                 std::string model, int status, std::int64_t prompt, std::int64_t completion,
                 bool counted = true) {
  UsageEvent e;
  e.ts = ts;
  e.user_id = user;
  e.key_id = key;
  e.route = "/v1/chat/completions";
  e.model = std::move(model);
  e.backend = "echo";
  e.status = status;
  e.prompt_tokens = prompt;
  e.completion_tokens = completion;
  e.latency_us = 1234;
  e.counted = counted;
  return e;
}

// Timestamps (UTC), checked against Python's datetime.
constexpr EpochMs k2024_03_15_102030 = 1710498030000;
constexpr EpochMs k2024_03_15_102000 = 1710498000000;
constexpr EpochMs k2024_03_14_230000 = 1710457200000;
constexpr EpochMs k2024_03_01_000000 = 1709251200000;
constexpr EpochMs k2024_02_29_235959_999 = 1709251199999;
constexpr EpochMs k2024_03_16_000000 = 1710547200000;
constexpr EpochMs k2024_12_31_235959 = 1735689599000;
constexpr EpochMs k2024_12_01_000000 = 1733011200000;
constexpr EpochMs k2024_11_30_120000 = 1732968000000;

}  // namespace

TEST_CASE("opening migrates to the latest user_version in WAL mode, and reopening is idempotent",
          "[metering][store]") {
  TempDatabase db;
  {
    auto store = open_sqlite_store(db.path());
    store->ensure_user("alice");
  }
  CHECK(read_pragma(db.path(), "user_version") == 3);
  CHECK(read_journal_mode(db.path()) == "wal");
  {
    auto store = open_sqlite_store(db.path());
    auto again = open_sqlite_store(db.path());
    CHECK(store->list_users().size() == 1);
    CHECK(again->find_user("alice").has_value());
  }
  CHECK(read_pragma(db.path(), "user_version") == 3);
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
          " DROP INDEX usage_events_ts;"
          " CREATE INDEX usage_events_user_ts ON usage_events(user_id, ts);"
          " CREATE INDEX usage_events_key_ts ON usage_events(key_id, ts);"
          " PRAGMA user_version = 1;");
  auto store = open_sqlite_store(db.path());
  CHECK(read_pragma(db.path(), "user_version") == 3);
  CHECK(read_text(db.path(), "SELECT group_concat(name, ',') FROM sqlite_master"
                             " WHERE type = 'index' AND tbl_name = 'usage_events'") == "usage_events_ts");
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

TEST_CASE("the store refuses a user name no caller should have passed", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  CHECK_THROWS_AS(store->ensure_user("line\nbreak"), StoreError);
  CHECK_THROWS_AS(store->ensure_user(std::string(100'000, 'n')), StoreError);
  CHECK_THROWS_AS(store->insert_key(new_key("cr\rlf", "tg-x0000000", "hx")), StoreError);
  CHECK(store->list_users().empty());
  CHECK(store->list_keys().empty());
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

TEST_CASE("users are created once, listed and limited", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());

  const User bob = store->ensure_user("bob");
  const User alice = store->ensure_user("alice");
  CHECK(bob.id > 0);
  CHECK(alice.id != bob.id);
  CHECK(bob.created_at > 1'600'000'000'000);
  CHECK(store->ensure_user("bob").id == bob.id);
  CHECK_FALSE(store->find_user("carol"));
  CHECK_THROWS_AS(store->ensure_user(""), StoreError);

  const auto users = store->list_users();
  REQUIRE(users.size() == 2);
  CHECK(users[0].name == "alice");
  CHECK(users[1].name == "bob");
  CHECK_FALSE(users[0].limits.any());

  Limits limits;
  limits.requests_per_minute = 10;
  limits.tokens_per_day = 5000;
  limits.tokens_per_month = 0;
  store->set_user_limits("bob", limits);
  CHECK(store->find_user("bob")->limits == limits);
  CHECK(store->find_user("alice")->limits == Limits{});
  store->set_user_limits("bob", Limits{});
  CHECK_FALSE(store->find_user("bob")->limits.any());
  CHECK_THROWS_AS(store->set_user_limits("carol", limits), StoreError);
}

TEST_CASE("keys are inserted, found by hash, listed with models and limits", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());

  NewKey spec = new_key("alice", "tg-AAAA1111", "hash-a");
  spec.models = {"gpt-small", "llama-3-8b"};
  spec.expires_at = 4'000'000'000'000;
  spec.limits.requests_per_day = 100;
  spec.limits.tokens_per_minute = 2000;
  const ApiKey inserted = store->insert_key(spec);
  CHECK(inserted.id > 0);
  CHECK(inserted.user_name == "alice");
  CHECK(inserted.prefix == "tg-AAAA1111");
  CHECK(inserted.sha256_hex == "hash-a");
  CHECK(inserted.models == std::vector<std::string>{"gpt-small", "llama-3-8b"});
  CHECK(inserted.expires_at == 4'000'000'000'000);
  CHECK_FALSE(inserted.revoked_at);
  CHECK(inserted.limits == spec.limits);
  CHECK(inserted.allows_model("gpt-small"));
  CHECK_FALSE(inserted.allows_model("gpt-large"));
  REQUIRE(store->find_user("alice"));
  CHECK(inserted.user_id == store->find_user("alice")->id);

  store->insert_key(new_key("bob", "tg-BBBB2222", "hash-b"));
  store->insert_key(new_key("alice", "tg-CCCC3333", "hash-c"));

  const auto found = store->find_key_by_hash("hash-b");
  REQUIRE(found);
  CHECK(found->user_name == "bob");
  CHECK(found->models.empty());
  CHECK(found->allows_model("anything"));
  CHECK_FALSE(found->limits.any());
  CHECK_FALSE(store->find_key_by_hash("hash-zzz"));

  CHECK(store->list_keys().size() == 3);
  const auto alices = store->list_keys("alice");
  REQUIRE(alices.size() == 2);
  CHECK(alices[0].prefix == "tg-AAAA1111");
  CHECK(alices[1].prefix == "tg-CCCC3333");
  CHECK(store->list_keys("nobody").empty());

  // The hash is unique; a model name cannot contain the list separator.
  CHECK_THROWS_AS(store->insert_key(new_key("bob", "tg-DDDD4444", "hash-a")), StoreError);
  NewKey bad = new_key("bob", "tg-EEEE5555", "hash-e");
  bad.models = {"a,b"};
  CHECK_THROWS_AS(store->insert_key(bad), StoreError);
  CHECK(store->list_keys().size() == 3);

  Limits key_limits;
  key_limits.tokens_per_month = 1'000'000;
  store->set_key_limits("tg-BBBB", key_limits);
  CHECK(store->find_key_by_hash("hash-b")->limits == key_limits);
  CHECK_THROWS_AS(store->set_key_limits("tg-ZZZZ", key_limits), StoreError);
}

TEST_CASE("revoke_key matches one key by prefix", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  store->insert_key(new_key("alice", "tg-ab12CDEF", "h1"));
  store->insert_key(new_key("alice", "tg-ab34GHIJ", "h2"));
  store->insert_key(new_key("bob", "tg-xyZ98765", "h3"));

  CHECK_THROWS_WITH(store->revoke_key("tg-ab", 1000), "prefix tg-ab is ambiguous: 2 keys");
  CHECK_THROWS_WITH(store->revoke_key("tg-nope", 1000), "no key with prefix tg-nope");
  // Matching is case-sensitive, like the keys themselves.
  CHECK_THROWS_AS(store->revoke_key("tg-XYZ", 1000), StoreError);
  CHECK_THROWS_AS(store->revoke_key("", 1000), StoreError);

  const ApiKey revoked = store->revoke_key("tg-ab12", 5000);
  CHECK(revoked.prefix == "tg-ab12CDEF");
  CHECK(revoked.revoked_at == 5000);
  CHECK_FALSE(revoked.active(6000));
  CHECK(store->find_key_by_hash("h1")->revoked_at == 5000);
  CHECK_FALSE(store->find_key_by_hash("h2")->revoked_at);

  CHECK_THROWS_WITH(store->revoke_key("tg-ab12CDEF", 6000), Catch::Contains("already revoked"));
  CHECK(store->find_key_by_hash("h1")->revoked_at == 5000);

  // With one of the two revoked, the short prefix is no longer ambiguous.
  CHECK(store->revoke_key("tg-ab", 7000).prefix == "tg-ab34GHIJ");
  CHECK(store->revoke_key("tg-xyZ98765", 8000).sha256_hex == "h3");
}

TEST_CASE("settings round-trip", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  CHECK_FALSE(store->get_setting("admin_key_sha256"));
  store->put_setting("admin_key_sha256", "abc");
  CHECK(store->get_setting("admin_key_sha256") == "abc");
  store->put_setting("admin_key_sha256", "def");
  CHECK(store->get_setting("admin_key_sha256") == "def");
}

TEST_CASE("keys_version moves on user, key and setting writes from any connection",
          "[metering][store]") {
  TempDatabase db;
  auto first = open_sqlite_store(db.path());
  auto second = open_sqlite_store(db.path());

  std::int64_t version = first->keys_version();
  CHECK(first->keys_version() == version);

  second->ensure_user("alice");
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  const ApiKey key = second->insert_key(new_key("alice", "tg-12345678", "h"));
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  second->revoke_key("tg-1234", 10);
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  Limits limits;
  limits.requests_per_minute = 3;
  second->set_user_limits("alice", limits);
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  second->put_setting("admin_key_sha256", "x");
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  // Its own writes count too.
  first->ensure_user("bob");
  CHECK(first->keys_version() != version);
  version = first->keys_version();

  // Usage traffic is not an access change: no reload storm while the writer runs.
  const UsageEvent e = event(1000, key.user_id, key.id, "m", 200, 1, 1);
  second->append_usage(std::span(&e, 1));
  CHECK(first->keys_version() == version);
}

TEST_CASE("append_usage stores events and usage() aggregates the daily rollup",
          "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  const ApiKey alice_key = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  const ApiKey bob_key = store->insert_key(new_key("bob", "tg-bob00000", "hb"));
  const std::int64_t alice = alice_key.user_id;
  const std::int64_t bob = bob_key.user_id;

  const std::vector<UsageEvent> events = {
      // 2024-03-14
      event(k2024_03_14_230000, alice, alice_key.id, "small", 200, 10, 20),
      event(k2024_03_14_230000 + 1, alice, alice_key.id, "large", 500, 5, 0),
      // 2024-03-15
      event(k2024_03_15_102000, alice, alice_key.id, "small", 200, 100, 200),
      event(k2024_03_15_102030, alice, alice_key.id, "small", 429, 0, 0, false),
      event(k2024_03_15_102030, bob, bob_key.id, "large", 200, 1, 2),
      // 2024-03-16
      event(k2024_03_16_000000, bob, bob_key.id, "large", 200, 1000, 2000),
      // Without a user (a 401): stored, but in no user's report.
      event(k2024_03_15_102030, std::nullopt, std::nullopt, "", 401, 0, 0, false),
  };
  store->append_usage(events);
  store->append_usage({});
  CHECK(store->count_usage_events() == 7);

  SECTION("per user") {
    const auto rows = store->usage({});
    REQUIRE(rows.size() == 2);
    CHECK(rows[0].user == "alice");
    CHECK(rows[0].day.empty());
    CHECK(rows[0].model.empty());
    CHECK(rows[0].requests == 4);
    CHECK(rows[0].errors == 2);
    CHECK(rows[0].prompt_tokens == 115);
    CHECK(rows[0].completion_tokens == 220);
    CHECK(rows[1].user == "bob");
    CHECK(rows[1].requests == 2);
    CHECK(rows[1].errors == 0);
    CHECK(rows[1].prompt_tokens == 1001);
    CHECK(rows[1].completion_tokens == 2002);
  }

  SECTION("per user, day and model") {
    const auto rows = store->usage(usage_query({}, {}, true, true));
    REQUIRE(rows.size() == 5);
    CHECK(rows[0].user == "alice");
    CHECK(rows[0].day == "2024-03-14");
    CHECK(rows[0].model == "large");
    CHECK(rows[0].errors == 1);
    CHECK(rows[1].day == "2024-03-14");
    CHECK(rows[1].model == "small");
    CHECK(rows[1].prompt_tokens == 10);
    CHECK(rows[2].user == "alice");
    CHECK(rows[2].day == "2024-03-15");
    CHECK(rows[2].model == "small");
    CHECK(rows[2].requests == 2);
    CHECK(rows[2].errors == 1);
    CHECK(rows[2].prompt_tokens == 100);
    CHECK(rows[2].completion_tokens == 200);
    CHECK(rows[3].user == "bob");
    CHECK(rows[3].day == "2024-03-15");
    CHECK(rows[4].day == "2024-03-16");
    CHECK(rows[4].prompt_tokens == 1000);
  }

  SECTION("per model over days, filtered by user") {
    const auto rows = store->usage(usage_query("alice", {}, false, true));
    REQUIRE(rows.size() == 2);
    CHECK(rows[0].model == "large");
    CHECK(rows[0].requests == 1);
    CHECK(rows[1].model == "small");
    CHECK(rows[1].requests == 3);
    CHECK(rows[1].prompt_tokens == 110);
    CHECK(store->usage(usage_query("nobody", {}, false, false)).empty());
  }

  SECTION("since is rounded down to its UTC day") {
    // 10:20:30 on the 15th still includes the 10:20:00 event of that day.
    const auto rows = store->usage(usage_query({}, k2024_03_15_102030, true, false));
    REQUIRE(rows.size() == 3);
    CHECK(rows[0].user == "alice");
    CHECK(rows[0].day == "2024-03-15");
    CHECK(rows[0].requests == 2);
    CHECK(rows[1].user == "bob");
    CHECK(rows[1].day == "2024-03-15");
    CHECK(rows[2].day == "2024-03-16");
  }
}

TEST_CASE("quota_state counts counted events in the current minute, day and month",
          "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  const ApiKey a = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  const ApiKey a2 = store->insert_key(new_key("alice", "tg-alice222", "ha2"));
  const ApiKey b = store->insert_key(new_key("bob", "tg-bob00000", "hb"));
  const EpochMs now = k2024_03_15_102030;

  store->append_usage(std::vector<UsageEvent>{
      // First millisecond of the current minute: minute, day, month.
      event(k2024_03_15_102000, a.user_id, a.id, "m", 200, 10, 5),
      // Last millisecond of the previous minute: day, month.
      event(k2024_03_15_102000 - 1, a.user_id, a.id, "m", 200, 60, 40),
      // Yesterday: month only.
      event(k2024_03_14_230000, a.user_id, a2.id, "m", 200, 1000, 0),
      // Last millisecond of the previous month: nothing.
      event(k2024_02_29_235959_999, a.user_id, a.id, "m", 200, 10000, 0),
      // Not admitted by the limiter: nothing, even now.
      event(now, a.user_id, a.id, "m", 429, 100000, 0, false),
      // An error that was admitted still consumed its request.
      event(now, b.user_id, b.id, "m", 502, 0, 0),
      // First millisecond of the month: month only.
      event(k2024_03_01_000000, b.user_id, b.id, "m", 200, 7, 0),
      // No user: never part of a subject's windows.
      event(now, std::nullopt, std::nullopt, "m", 200, 3, 3),
  });

  const Store::QuotaState state = store->quota_state(now);
  REQUIRE(state.users.size() == 2);
  REQUIRE(state.keys.size() == 3);
  CHECK_FALSE(state.users.count(0));
  CHECK_FALSE(state.keys.count(0));

  const SubjectUsage& alice = state.users.at(a.user_id);
  CHECK(alice.minute.requests == 1);
  CHECK(alice.minute.tokens == 15);
  CHECK(alice.day.requests == 2);
  CHECK(alice.day.tokens == 115);
  CHECK(alice.month.requests == 3);
  CHECK(alice.month.tokens == 1115);

  const SubjectUsage& key_a = state.keys.at(a.id);
  CHECK(key_a.minute.requests == 1);
  CHECK(key_a.day.requests == 2);
  CHECK(key_a.day.tokens == 115);
  CHECK(key_a.month.requests == 2);
  CHECK(key_a.month.tokens == 115);

  const SubjectUsage& key_a2 = state.keys.at(a2.id);
  CHECK(key_a2.minute.requests == 0);
  CHECK(key_a2.day.requests == 0);
  CHECK(key_a2.month.requests == 1);
  CHECK(key_a2.month.tokens == 1000);

  const SubjectUsage& bob = state.users.at(b.user_id);
  CHECK(bob.minute.requests == 1);
  CHECK(bob.minute.tokens == 0);
  CHECK(bob.day.requests == 1);
  CHECK(bob.month.requests == 2);
  CHECK(bob.month.tokens == 7);
  CHECK(state.keys.at(b.id).month.requests == 2);

  SECTION("a new minute and a new day start from zero") {
    const Store::QuotaState later = store->quota_state(k2024_03_16_000000);
    const SubjectUsage& alice_later = later.users.at(a.user_id);
    CHECK(alice_later.minute.requests == 0);
    CHECK(alice_later.day.requests == 0);
    CHECK(alice_later.month.requests == 3);
  }
}

TEST_CASE("quota_state's month window crosses the year correctly", "[metering][store]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  const ApiKey a = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  store->append_usage(std::vector<UsageEvent>{
      event(k2024_12_01_000000, a.user_id, a.id, "m", 200, 1, 0),
      event(k2024_12_31_235959, a.user_id, a.id, "m", 200, 2, 0),
      event(k2024_11_30_120000, a.user_id, a.id, "m", 200, 4, 0),
  });
  const SubjectUsage december = store->quota_state(k2024_12_31_235959).users.at(a.user_id);
  CHECK(december.month.requests == 2);
  CHECK(december.month.tokens == 3);
  CHECK(december.day.tokens == 2);
  CHECK(december.minute.tokens == 2);
  // 2025-01-01T00:00:00Z: a new month, nothing counted yet.
  const auto january = store->quota_state(k2024_12_31_235959 + 1000);
  CHECK(january.users.empty());
}

TEST_CASE("jobs are stored at once, updated, picked up unfinished in order, and purged after they expire",
          "[metering][store][jobs]") {
  TempDatabase db;
  auto store = open_sqlite_store(db.path());
  auto job = [](std::string id, EpochMs created) {
    JobRecord j;
    j.id = std::move(id);
    j.endpoint = "summarize";
    j.user_id = 7;
    j.key_id = 9;
    j.request = R"({"input":{"prompt":"hi"}})";
    j.webhook = "https://example.com/hook";
    j.created_at = created;
    j.execution_timeout_ms = 60'000;
    j.ttl_ms = 1'000;
    return j;
  };
  store->insert_job(job("job-b", 200));
  store->insert_job(job("job-a", 100));
  store->insert_job(job("job-c", 300));
  CHECK_THROWS_AS(store->insert_job(job("job-a", 400)), StoreError);

  // Another connection sees them: each insert is its own committed transaction.
  auto other = open_sqlite_store(db.path());
  auto a = other->find_job("job-a");
  REQUIRE(a);
  CHECK(a->endpoint == "summarize");
  CHECK(a->user_id == 7);
  CHECK(a->key_id == 9);
  CHECK(a->state == JobState::in_queue);
  CHECK(a->request == R"({"input":{"prompt":"hi"}})");
  CHECK(a->webhook == "https://example.com/hook");
  CHECK_FALSE(other->find_job("job-zzz"));

  auto b = *store->find_job("job-b");
  b.state = JobState::in_progress;
  b.started_at = 250;
  b.attempts = 1;
  store->update_job(b);
  auto c = *store->find_job("job-c");
  c.state = JobState::completed;
  c.output = R"({"text":"done"})";
  c.started_at = 300;
  c.finished_at = 400;
  c.expires_at = 1'400;
  store->update_job(c);

  auto unfinished = other->unfinished_jobs();
  REQUIRE(unfinished.size() == 2);
  CHECK(unfinished[0].id == "job-a");  // oldest first
  CHECK(unfinished[1].id == "job-b");
  CHECK(unfinished[1].state == JobState::in_progress);
  CHECK(unfinished[1].attempts == 1);
  CHECK(other->find_job("job-c")->output == R"({"text":"done"})");

  CHECK(store->purge_jobs(1'399) == 0);
  CHECK(store->purge_jobs(1'400) == 1);  // only the finished one, once expired
  CHECK_FALSE(store->find_job("job-c"));
  CHECK(store->find_job("job-a"));
  CHECK(store->purge_jobs(1'000'000) == 0);  // unfinished jobs never expire
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
