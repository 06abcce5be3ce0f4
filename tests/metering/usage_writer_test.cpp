#include "metering/usage_writer.hpp"

#include <sqlite3.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tests/metering/temp_database.hpp"

using namespace tollgate::metering;
using namespace std::chrono_literals;
using tollgate::metering::test::TempDatabase;

namespace {

UsageEvent make_event(std::int64_t n) {
  UsageEvent e;
  e.ts = 1'700'000'000'000 + n;
  e.route = "/v1/completions";
  e.model = "m";
  e.status = 200;
  e.prompt_tokens = 1;
  e.completion_tokens = 2;
  return e;
}

// Delegates to a real store; fails the next N append_usage calls (all of them when N < 0).
class FlakyStore : public Store {
 public:
  FlakyStore(std::unique_ptr<Store> inner, std::shared_ptr<std::atomic<int>> failures_left)
      : inner_(std::move(inner)), failures_left_(std::move(failures_left)) {}

  User ensure_user(std::string_view name) override { return inner_->ensure_user(name); }
  std::optional<User> find_user(std::string_view name) override { return inner_->find_user(name); }
  std::vector<User> list_users() override { return inner_->list_users(); }
  void set_user_limits(std::string_view name, const Limits& limits) override { inner_->set_user_limits(name, limits); }
  ApiKey insert_key(const NewKey& key) override { return inner_->insert_key(key); }
  std::vector<ApiKey> list_keys(std::optional<std::string_view> user) override { return inner_->list_keys(user); }
  std::optional<ApiKey> find_key_by_hash(std::string_view hash) override { return inner_->find_key_by_hash(hash); }
  ApiKey revoke_key(std::string_view prefix, EpochMs now) override { return inner_->revoke_key(prefix, now); }
  void set_key_limits(std::string_view prefix, const Limits& limits) override {
    inner_->set_key_limits(prefix, limits);
  }
  std::int64_t keys_version() override { return inner_->keys_version(); }
  std::optional<std::string> get_setting(std::string_view name) override { return inner_->get_setting(name); }
  void put_setting(std::string_view name, std::string_view value) override { inner_->put_setting(name, value); }
  void append_usage(std::span<const UsageEvent> events) override {
    if (failures_left_->load() != 0) {
      failures_left_->fetch_sub(1);
      throw std::runtime_error("disk on fire (test)");
    }
    inner_->append_usage(events);
  }
  std::vector<UsageRow> usage(const UsageQuery& query) override { return inner_->usage(query); }
  std::int64_t count_usage_events() override { return inner_->count_usage_events(); }
  QuotaState quota_state(EpochMs now) override { return inner_->quota_state(now); }
  void insert_job(const JobRecord& job) override { inner_->insert_job(job); }
  void update_job(const JobRecord& job) override { inner_->update_job(job); }
  std::vector<bool> write_jobs(std::span<const JobWrite> writes) override { return inner_->write_jobs(writes); }
  std::optional<JobRecord> find_job(std::string_view id) override { return inner_->find_job(id); }
  std::vector<JobRecord> unfinished_jobs() override { return inner_->unfinished_jobs(); }
  std::int64_t purge_jobs(EpochMs now) override { return inner_->purge_jobs(now); }
  BudgetOutcome claim_budgets(std::span<const BudgetClaim> claims) override { return inner_->claim_budgets(claims); }
  void adjust_budgets(std::span<const BudgetAdjustment> adjustments) override { inner_->adjust_budgets(adjustments); }
  std::int64_t purge_budgets(EpochMs before) override { return inner_->purge_budgets(before); }

 private:
  std::unique_ptr<Store> inner_;
  std::shared_ptr<std::atomic<int>> failures_left_;
};

}  // namespace

TEST_CASE("stop() writes every event enqueued from several threads, in batches", "[metering][usage_writer]") {
  TempDatabase db;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2500;
  std::atomic<std::size_t> observed_rows{0};
  std::atomic<int> observed_batches{0};
  UsageWriter::Stats stats;
  {
    UsageWriter writer(open_sqlite_store(db.path()), 20ms, 1024, [&](std::size_t rows, std::chrono::microseconds took) {
      observed_rows += rows;
      ++observed_batches;
      CHECK(took.count() >= 0);
    });
    std::vector<std::thread> producers;
    for (int t = 0; t < kThreads; ++t) {
      producers.emplace_back([&writer, t] {
        for (int i = 0; i < kPerThread; ++i) writer.enqueue(make_event(t * kPerThread + i));
      });
    }
    for (auto& producer : producers) producer.join();
    writer.stop();
    writer.stop();  // idempotent
    stats = writer.stats();
    CHECK(writer.queue_depth() == 0);
  }
  CHECK(stats.written == 10'000);
  CHECK(stats.failures == 0);
  CHECK(stats.batches >= 1);
  CHECK(stats.batches <= 100);  // many rows per transaction, not one each
  CHECK(observed_rows == 10'000);
  CHECK(observed_batches == static_cast<int>(stats.batches));

  auto fresh = open_sqlite_store(db.path());
  CHECK(fresh->count_usage_events() == 10'000);
  const auto rows = fresh->usage({});
  CHECK(rows.empty());  // no user on these events: stored, but in nobody's report
}

TEST_CASE("flush() makes enqueued rows visible without waiting for the interval", "[metering][usage_writer]") {
  TempDatabase db;
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(open_sqlite_store(db.path()), 60s);

  for (int i = 0; i < 3; ++i) writer.enqueue(make_event(i));
  CHECK(writer.queue_depth() == 3);
  CHECK(reader->count_usage_events() == 0);

  const auto started = std::chrono::steady_clock::now();
  writer.flush();
  CHECK(std::chrono::steady_clock::now() - started < 10s);
  CHECK(reader->count_usage_events() == 3);
  CHECK(writer.queue_depth() == 0);
  CHECK(writer.stats().written == 3);

  writer.flush();  // nothing pending: returns at once
  writer.enqueue(make_event(3));
  writer.flush();
  CHECK(reader->count_usage_events() == 4);
  CHECK(writer.stats().batches == 2);
}

TEST_CASE("a full batch wakes the writer before the interval", "[metering][usage_writer]") {
  TempDatabase db;
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(open_sqlite_store(db.path()), 60s, 8);
  for (int i = 0; i < 8; ++i) writer.enqueue(make_event(i));
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (reader->count_usage_events() < 8 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  CHECK(reader->count_usage_events() == 8);
}

TEST_CASE("failed batches are retried, not dropped", "[metering][usage_writer]") {
  TempDatabase db;
  auto failures_left = std::make_shared<std::atomic<int>>(2);
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(std::make_unique<FlakyStore>(open_sqlite_store(db.path()), failures_left), 10ms);
  for (int i = 0; i < 50; ++i) writer.enqueue(make_event(i));
  writer.flush();
  CHECK(failures_left->load() == 0);
  CHECK(reader->count_usage_events() == 50);
  const auto stats = writer.stats();
  CHECK(stats.failures == 2);
  CHECK(stats.written == 50);
}

TEST_CASE("stop() returns when the store keeps failing", "[metering][usage_writer]") {
  TempDatabase db;
  auto failures_left = std::make_shared<std::atomic<int>>(-1);  // fail forever
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(std::make_unique<FlakyStore>(open_sqlite_store(db.path()), failures_left), 10ms);
  for (int i = 0; i < 5; ++i) writer.enqueue(make_event(i));
  writer.stop();
  writer.flush();  // the writer is gone: must not hang
  CHECK(writer.stats().failures >= 1);
  CHECK(writer.stats().written == 0);
  CHECK(writer.queue_depth() == 0);
  CHECK(reader->count_usage_events() == 0);
}

TEST_CASE("events enqueued after stop() are still written", "[metering][usage_writer]") {
  TempDatabase db;
  UsageWriter writer(open_sqlite_store(db.path()), 10ms);
  writer.enqueue(make_event(1));
  writer.stop();
  writer.enqueue(make_event(2));
  writer.flush();
  CHECK(writer.stats().written == 2);
  CHECK(open_sqlite_store(db.path())->count_usage_events() == 2);
}

TEST_CASE("while the database is locked the queue stays bounded and the drops are counted",
          "[metering][usage_writer]") {
  TempDatabase db;
  auto reader = open_sqlite_store(db.path());
  constexpr std::size_t kMaxQueued = 100;
  UsageWriter writer(open_sqlite_store(db.path()), 10ms, 4096, {}, kMaxQueued);

  // Another connection holds the write lock: every batch fails once the busy timeout runs out.
  sqlite3* locker = nullptr;
  REQUIRE(sqlite3_open(db.path().c_str(), &locker) == SQLITE_OK);
  REQUIRE(sqlite3_exec(locker, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);

  std::size_t accepted = 0;
  for (int i = 0; i < 1000; ++i) accepted += writer.enqueue(make_event(i)) ? 1 : 0;
  CHECK(accepted == kMaxQueued);
  CHECK(writer.stats().dropped == 1000 - kMaxQueued);

  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (writer.stats().failures == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  REQUIRE(writer.stats().failures >= 1);  // a real SQLITE_BUSY, not a simulated one
  // The failed rows are kept (waiting, or being retried), and still no more than the bound.
  CHECK(writer.queue_depth() <= kMaxQueued);
  CHECK_FALSE(writer.enqueue(make_event(1000)));
  CHECK(writer.stats().dropped == 1001 - kMaxQueued);

  REQUIRE(sqlite3_exec(locker, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(locker);
  writer.flush();
  CHECK(reader->count_usage_events() == static_cast<std::int64_t>(kMaxQueued));
  // Room again once the store recovered.
  CHECK(writer.enqueue(make_event(1001)));
  writer.flush();
  CHECK(reader->count_usage_events() == static_cast<std::int64_t>(kMaxQueued) + 1);
  CHECK(writer.stats().written == kMaxQueued + 1);
}

TEST_CASE("each row gets a request id unique across writers, and keeps one it came with", "[metering][usage_writer]") {
  TempDatabase db;
  {
    UsageWriter first(open_sqlite_store(db.path()), 60s);
    UsageWriter second(open_sqlite_store(db.path()), 60s);
    for (int i = 0; i < 3; ++i) {
      first.enqueue(make_event(i));
      second.enqueue(make_event(i));
    }
    UsageEvent named = make_event(9);
    named.request_id = "given-id";
    first.enqueue(named);
  }
  sqlite3* raw = nullptr;
  REQUIRE(sqlite3_open(db.path().c_str(), &raw) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(raw, "SELECT request_id FROM usage_events", -1, &stmt, nullptr) == SQLITE_OK);
  std::set<std::string> ids;
  int rows = 0;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    REQUIRE(text != nullptr);
    ids.insert(text);
    ++rows;
  }
  sqlite3_finalize(stmt);
  sqlite3_close(raw);
  CHECK(rows == 7);
  CHECK(ids.size() == 7);
  CHECK(ids.contains("given-id"));
}

namespace {

// Bounded wait for `done`.
template <class F>
bool eventually(F done) {
  for (int i = 0; i < 200; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(25ms);
  }
  return done();
}

}  // namespace

TEST_CASE("rows past max_queued go to the spill file and reach the store when it takes rows again",
          "[metering][usage_writer][spill]") {
  TempDatabase db;
  const std::string spill = db.path() + ".spill";
  auto failures = std::make_shared<std::atomic<int>>(-1);  // failing until told otherwise
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(std::make_unique<FlakyStore>(open_sqlite_store(db.path()), failures), 20ms, 64, {}, 50, spill);
  for (int i = 0; i < 300; ++i) CHECK(writer.enqueue(make_event(i)));
  CHECK(eventually([&] { return writer.stats().spilled == 250; }));
  CHECK(writer.spill_depth() == 250);
  CHECK(std::filesystem::exists(spill));
  CHECK(reader->count_usage_events() == 0);

  failures->store(0);  // the store is back
  CHECK(eventually([&] { return reader->count_usage_events() == 300; }));
  CHECK(eventually([&] { return writer.spill_depth() == 0; }));
  writer.stop();
  CHECK(reader->count_usage_events() == 300);
  CHECK(writer.stats().dropped == 0);
  CHECK(writer.stats().replayed == 250);
  CHECK_FALSE(std::filesystem::exists(spill));  // nothing pending, nothing left behind
}

TEST_CASE("rows the store cannot take at stop are kept in the spill file for the next writer",
          "[metering][usage_writer][spill]") {
  TempDatabase db;
  const std::string spill = db.path() + ".spill";
  {
    auto failures = std::make_shared<std::atomic<int>>(-1);
    UsageWriter writer(std::make_unique<FlakyStore>(open_sqlite_store(db.path()), failures), 20ms, 64, {}, 1000, spill);
    for (int i = 0; i < 40; ++i) writer.enqueue(make_event(i));
    writer.stop();
    CHECK(writer.stats().dropped == 0);
    CHECK(writer.stats().spilled == 40);
  }
  // A crash cut a row short after them: skipped, and the rows after it are whole.
  { std::ofstream(spill, std::ios::app) << "1700000000000\t1\t"; }
  auto reader = open_sqlite_store(db.path());
  CHECK(reader->count_usage_events() == 0);
  UsageWriter next(open_sqlite_store(db.path()), 20ms, 16, {}, 1000, spill);
  CHECK(next.spill_depth() == 41);
  next.enqueue(make_event(100));
  CHECK(eventually([&] { return reader->count_usage_events() == 41; }));
  next.stop();
  CHECK(reader->count_usage_events() == 41);
  CHECK(next.stats().replayed == 40);
  CHECK_FALSE(std::filesystem::exists(spill));
}

TEST_CASE("a spill line keeps every field of a row, odd text included", "[metering][usage_writer][spill]") {
  UsageEvent e = make_event(7);
  e.user_id = 3;
  e.key_id = std::nullopt;
  e.route = "/a\tb\nc\\d\re";
  e.backend = "";
  e.ttft_us = 1234;
  e.counted = true;
  e.estimated = true;
  e.request_id = "abc";
  const std::string line = spill_line(e);
  CHECK(line.find('\n') == std::string::npos);
  auto back = parse_spill_line(line);
  REQUIRE(back);
  CHECK(back->ts == e.ts);
  CHECK(back->user_id == 3);
  CHECK_FALSE(back->key_id);
  CHECK(back->route == e.route);
  CHECK(back->model == "m");
  CHECK(back->backend.empty());
  CHECK(back->status == 200);
  CHECK(back->prompt_tokens == 1);
  CHECK(back->completion_tokens == 2);
  CHECK(back->ttft_us == 1234);
  CHECK(back->counted);
  CHECK(back->estimated);
  CHECK(back->request_id == "abc");
  CHECK_FALSE(parse_spill_line(line.substr(0, line.size() / 2)));
  CHECK_FALSE(parse_spill_line("x\t" + line.substr(line.find('\t') + 1)));
  CHECK_FALSE(parse_spill_line(""));
}

TEST_CASE("spilled rows reach the store while new rows keep coming, and a failing store is not retried per row",
          "[metering][usage_writer][spill]") {
  TempDatabase db;
  const std::string spill = db.path() + ".spill";
  auto failures = std::make_shared<std::atomic<int>>(-1);
  auto reader = open_sqlite_store(db.path());
  UsageWriter writer(std::make_unique<FlakyStore>(open_sqlite_store(db.path()), failures), 200ms, 64, {}, 20, spill);
  // 500 rows past the bound while the store fails: each goes to the spill file,
  // and the store is tried about once per interval, not once per row.
  for (int i = 0; i < 520; ++i) writer.enqueue(make_event(i));
  CHECK(eventually([&] { return writer.stats().spilled == 500; }));
  CHECK(writer.stats().failures <= 3);

  failures->store(0);
  // New rows all along: the queue is never empty for long, the spill drains anyway.
  for (int i = 0; i < 100 && writer.spill_depth() > 0; ++i) {
    writer.enqueue(make_event(1000 + i));
    std::this_thread::sleep_for(10ms);
  }
  CHECK(eventually([&] { return writer.spill_depth() == 0; }));
  writer.stop();
  CHECK(writer.stats().dropped == 0);
  CHECK(reader->count_usage_events() == static_cast<std::int64_t>(writer.stats().written));
  CHECK(writer.stats().replayed ==
        writer.stats().spilled);  // 500, and a few that came while the queue held the failed rows
}
