// The store contract (store_contract.hpp), run on every store.
#include "tests/metering/store_contract.hpp"

#include <catch2/catch.hpp>
#include <span>
#include <thread>
#include <vector>

#include "metering/text_bounds.hpp"

using namespace tollgate::metering;
using namespace tollgate::metering::test;

TEST_CASE("the store refuses a user name no caller should have passed", "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();
  CHECK_THROWS_AS(store->ensure_user("line\nbreak"), StoreError);
  CHECK_THROWS_AS(store->ensure_user(std::string(100'000, 'n')), StoreError);
  CHECK_THROWS_AS(store->insert_key(new_key("cr\rlf", "tg-x0000000", "hx")), StoreError);
  CHECK(store->list_users().empty());
  CHECK(store->list_keys().empty());
}

TEST_CASE("users are created once, listed and limited", "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();

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
  ContractDatabase db;
  auto store = db.open();

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
  ContractDatabase db;
  auto store = db.open();
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
  ContractDatabase db;
  auto store = db.open();
  CHECK_FALSE(store->get_setting("admin_key_sha256"));
  store->put_setting("admin_key_sha256", "abc");
  CHECK(store->get_setting("admin_key_sha256") == "abc");
  store->put_setting("admin_key_sha256", "def");
  CHECK(store->get_setting("admin_key_sha256") == "def");
}

TEST_CASE("keys_version moves on user, key and setting writes from any connection", "[metering][store]") {
  ContractDatabase db;
  auto first = db.open();
  auto second = db.open();

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

TEST_CASE("append_usage stores events and usage() aggregates the daily rollup", "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();
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

TEST_CASE("quota_state counts counted events in the current minute, day and month", "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();
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
  ContractDatabase db;
  auto store = db.open();
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
  ContractDatabase db;
  auto store = db.open();
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
  auto other = db.open();
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

TEST_CASE("a large usage batch is stored row for row and rolled up once per day, user, key and model",
          "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();
  const ApiKey key = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  // More rows than either store puts in one INSERT, over two days and two models.
  std::vector<UsageEvent> events;
  for (int i = 0; i < 1234; ++i) {
    events.push_back(event(k2024_03_15_102000 + (i % 2) * 86'400'000, key.user_id, key.id, i % 3 ? "a" : "b",
                           i % 10 ? 200 : 500, 1, 2));
  }
  store->append_usage(events);
  store->append_usage(std::span(events).subspan(0, 10));  // the same day rows again: added, not replaced
  CHECK(store->count_usage_events() == 1244);
  const auto rows = store->usage(usage_query(std::nullopt, std::nullopt, true, true));
  REQUIRE(rows.size() == 4);
  std::int64_t requests = 0, errors = 0, prompt = 0, completion = 0;
  for (const auto& row : rows) {
    requests += row.requests;
    errors += row.errors;
    prompt += row.prompt_tokens;
    completion += row.completion_tokens;
  }
  CHECK(requests == 1244);
  CHECK(errors == 124 + 1);
  CHECK(prompt == 1244);
  CHECK(completion == 2488);
}

TEST_CASE("odd text in a usage row is stored bounded and never fails its batch", "[metering][store]") {
  ContractDatabase db;
  auto store = db.open();
  const ApiKey key = store->insert_key(new_key("alice", "tg-alice000", "ha"));
  std::vector<UsageEvent> events;
  events.push_back(event(k2024_03_15_102000, key.user_id, key.id, std::string("nul\0inside", 10), 200, 1, 1));
  events.push_back(event(k2024_03_15_102000, key.user_id, key.id, "bad \xff\xfe utf-8", 200, 1, 1));
  events.push_back(event(k2024_03_15_102000, key.user_id, key.id, std::string(100'000, 'm'), 404, 0, 0));
  events.back().route = std::string(100'000, '/');
  events.back().backend = std::string(100'000, 'b');
  // Bytes that delimit rows and fields in bulk formats are only text here.
  events.push_back(event(k2024_03_15_102000, key.user_id, key.id, "tab\there\nnew \\N\\slash\r", 200, 1, 1));
  events.back().route = "\\.\n";
  store->append_usage(events);
  CHECK(store->count_usage_events() == 4);
  const auto rows = store->usage(usage_query(std::nullopt, std::nullopt, false, true));
  REQUIRE(rows.size() == 4);
  bool delimiters_intact = false;
  for (const auto& row : rows) {
    CHECK(row.model.size() <= kMaxStoredName);
    CHECK(row.requests == 1);
    delimiters_intact = delimiters_intact || row.model == "tab\there\nnew \\N\\slash\r";
  }
  CHECK(delimiters_intact);
}

TEST_CASE("job writes in one batch: a refused insert fails alone, and a store error undoes nothing else",
          "[metering][store][jobs]") {
  ContractDatabase db;
  auto store = db.open();
  JobRecord job;
  job.id = "job-a";
  job.endpoint = "e";
  job.user_id = 1;
  job.key_id = 1;
  job.request = "{}";
  job.created_at = 1;
  JobRecord done = job;
  done.state = JobState::completed;
  done.finished_at = 2;
  JobRecord other = job;
  other.id = "job-b";
  const std::vector<JobWrite> writes = {{true, job}, {true, job}, {false, done}, {true, other}};
  const auto applied = store->write_jobs(writes);
  CHECK(applied == std::vector<bool>{true, false, true, true});
  auto a = store->find_job("job-a");
  REQUIRE(a);
  CHECK(a->state == JobState::completed);
  CHECK(store->find_job("job-b"));
  CHECK(store->write_jobs({}).empty());
}

namespace {

BudgetClaim claim(std::string subject, std::string limit_name, std::int64_t limit, std::int64_t need,
                  std::int64_t window = 100) {
  return {std::move(subject), std::move(limit_name), window, 1'000'000 + window, limit, need, 0};
}

}  // namespace

TEST_CASE("budget claims grant the need, lease more while much is left, and never grant past the limit",
          "[metering][store][budget]") {
  ContractDatabase db;
  auto store = db.open();

  // 1000 left: the need (10) plus a sixteenth of the 990 beyond it.
  const std::vector<BudgetClaim> first{claim("key:1", "tokens_per_minute", 1000, 10)};
  auto outcome = store->claim_budgets(first);
  REQUIRE_FALSE(outcome.refused);
  CHECK(outcome.granted == std::vector<std::int64_t>{10 + 990 / 16});
  CHECK(outcome.remaining == std::vector<std::int64_t>{1000 - 10 - 990 / 16});

  // Small budgets go one need at a time: a limit of 20 requests is 20 grants of 1.
  std::int64_t granted = 0;
  int grants = 0;
  for (int i = 0; i < 40; ++i) {
    const std::vector<BudgetClaim> one{claim("key:2", "requests_per_minute", 20, 1)};
    auto o = store->claim_budgets(one);
    if (o.refused) {
      CHECK(*o.refused == 0);
      CHECK(o.granted == std::vector<std::int64_t>{0});
      CHECK(o.remaining == std::vector<std::int64_t>{0});
      continue;
    }
    CHECK(o.granted[0] == 1);
    granted += o.granted[0];
    ++grants;
  }
  CHECK(granted == 20);
  CHECK(grants == 20);

  // Whatever the needs, grants add up to at most the limit, and to all of it
  // once needs of one are all that fit.
  std::int64_t total = 0;
  for (int i = 0; i < 400; ++i) {
    const std::int64_t need = i < 200 ? 7 : 1;
    const std::vector<BudgetClaim> one{claim("user:3", "tokens_per_day", 5000, need)};
    auto o = store->claim_budgets(one);
    if (!o.refused) {
      CHECK(o.granted[0] >= need);
      total += o.granted[0];
      CHECK(o.remaining[0] == 5000 - total);
    }
  }
  CHECK(total == 5000);

  // Another window of the same limit is another budget.
  const std::vector<BudgetClaim> next{claim("key:2", "requests_per_minute", 20, 1, 101)};
  CHECK_FALSE(store->claim_budgets(next).refused);
}

TEST_CASE("a new budget starts from what its window used before, an existing one ignores that",
          "[metering][store][budget]") {
  ContractDatabase db;
  auto store = db.open();
  BudgetClaim first = claim("key:1", "requests_per_day", 5, 1);
  first.used_before = 3;  // three requests in the usage rows before budgets were kept
  std::vector<BudgetClaim> claims{first};
  auto o = store->claim_budgets(claims);
  REQUIRE_FALSE(o.refused);
  CHECK(o.granted[0] == 1);
  CHECK(o.remaining[0] == 1);
  claims[0].used_before = 0;  // the row exists: its count stands
  CHECK_FALSE(store->claim_budgets(claims).refused);
  CHECK(store->claim_budgets(claims).refused);

  BudgetClaim over = claim("key:2", "requests_per_day", 5, 1);
  over.used_before = 9;
  const std::vector<BudgetClaim> spent{over};
  CHECK(store->claim_budgets(spent).refused);
}

TEST_CASE("a set of budget claims is granted whole or not at all", "[metering][store][budget]") {
  ContractDatabase db;
  auto store = db.open();
  const std::vector<BudgetClaim> fill{claim("user:1", "requests_per_day", 3, 3)};
  REQUIRE_FALSE(store->claim_budgets(fill).refused);

  // The key's budget has room, the user's has none: neither is touched.
  const std::vector<BudgetClaim> both{claim("key:9", "requests_per_day", 10, 1),
                                      claim("user:1", "requests_per_day", 3, 1)};
  auto o = store->claim_budgets(both);
  REQUIRE(o.refused);
  CHECK(*o.refused == 1);
  CHECK(o.granted == std::vector<std::int64_t>{0, 0});

  const std::vector<BudgetClaim> key_alone{claim("key:9", "requests_per_day", 10, 10)};
  auto all = store->claim_budgets(key_alone);
  REQUIRE_FALSE(all.refused);
  CHECK(all.granted[0] == 10);  // the refused set took nothing from it

  // A need larger than the limit never fits.
  const std::vector<BudgetClaim> huge{claim("key:10", "tokens_per_minute", 100, 101)};
  CHECK(store->claim_budgets(huge).refused);
}

TEST_CASE("budgets take back unused leases, charge use past them, and are purged after their window",
          "[metering][store][budget]") {
  ContractDatabase db;
  auto store = db.open();
  const std::vector<BudgetClaim> fill{claim("key:1", "requests_per_minute", 5, 5)};
  REQUIRE_FALSE(store->claim_budgets(fill).refused);
  const std::vector<BudgetClaim> one{claim("key:1", "requests_per_minute", 5, 1)};
  CHECK(store->claim_budgets(one).refused);

  // Two given back: two more fit.
  const std::vector<BudgetAdjustment> give_back{{"key:1", "requests_per_minute", 100, 1'000'100, -2}};
  store->adjust_budgets(give_back);
  CHECK_FALSE(store->claim_budgets(one).refused);
  CHECK_FALSE(store->claim_budgets(one).refused);
  CHECK(store->claim_budgets(one).refused);

  // A budget never goes below zero, and a charge counts against it.
  const std::vector<BudgetAdjustment> too_much{{"key:1", "requests_per_minute", 100, 1'000'100, -50}};
  store->adjust_budgets(too_much);
  const std::vector<BudgetClaim> six{claim("key:1", "requests_per_minute", 5, 6)};
  CHECK(store->claim_budgets(six).refused);
  const std::vector<BudgetAdjustment> charge{{"key:1", "requests_per_minute", 100, 1'000'100, 4},
                                             {"key:5", "tokens_per_day", 7, 2'000'000, 30}};
  store->adjust_budgets(charge);
  const std::vector<BudgetClaim> two{claim("key:1", "requests_per_minute", 5, 2)};
  CHECK(store->claim_budgets(two).refused);  // 4 charged of 5
  CHECK_FALSE(store->claim_budgets(one).refused);
  const std::vector<BudgetClaim> charged{{"key:5", "tokens_per_day", 7, 2'000'000, 40, 11, 0}};
  CHECK(store->claim_budgets(charged).refused);  // 30 charged: 10 left of 40

  CHECK(store->purge_budgets(1'000'101) == 1);      // key:1's window ended at 1 000 100
  CHECK_FALSE(store->claim_budgets(fill).refused);  // a new row, a full budget
  CHECK(store->purge_budgets(3'000'000) == 2);
}

TEST_CASE("budget claims from many connections at once never add up past the limit", "[metering][store][budget]") {
  ContractDatabase db;
  auto setup = db.open();  // migrates once
  constexpr int kThreads = 4;
  constexpr std::int64_t kLimit = 300;
  std::vector<std::unique_ptr<Store>> stores;
  for (int t = 0; t < kThreads; ++t) stores.push_back(db.open());
  std::vector<std::int64_t> granted(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Mixed needs over two budgets at once, as a request under a user's and a key's limit claims.
      for (int i = 0; i < 200; ++i) {
        const std::int64_t need = 1 + (i + t) % 3;
        const std::vector<BudgetClaim> claims{claim("user:1", "requests_per_day", kLimit, need),
                                              claim("key:1", "requests_per_day", kLimit * 1'000'000, need)};
        auto o = stores[t]->claim_budgets(claims);
        if (!o.refused) granted[t] += o.granted[0];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  std::int64_t total = 0;
  for (auto g : granted) total += g;
  CHECK(total == kLimit);
  const std::vector<BudgetClaim> one{claim("user:1", "requests_per_day", kLimit, 1)};
  CHECK(setup->claim_budgets(one).refused);
}
