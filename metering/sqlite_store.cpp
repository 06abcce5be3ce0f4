// The embedded metering store: one SQLite connection in WAL mode per object.
#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "metering/store_rows.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::metering {
namespace {

// Ordered schema migrations: step i brings the database to user_version i + 1.
// A schema change appends a step; existing steps never change.
constexpr const char* kMigrations[] = {
    R"sql(
CREATE TABLE users (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  rpm INTEGER, tpm INTEGER, rpd INTEGER, tpd INTEGER, tokens_per_month INTEGER
);
CREATE TABLE api_keys (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  prefix TEXT NOT NULL,
  sha256 TEXT NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  expires_at INTEGER,
  revoked_at INTEGER,
  models TEXT NOT NULL DEFAULT '',
  rpm INTEGER, tpm INTEGER, rpd INTEGER, tpd INTEGER, tokens_per_month INTEGER
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE TABLE settings (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE usage_events (
  id INTEGER PRIMARY KEY,
  ts INTEGER NOT NULL,
  user_id INTEGER,
  key_id INTEGER,
  route TEXT NOT NULL,
  model TEXT NOT NULL,
  backend TEXT NOT NULL,
  status INTEGER NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_us INTEGER NOT NULL,
  ttft_us INTEGER,
  counted INTEGER NOT NULL,
  estimated INTEGER NOT NULL
);
CREATE INDEX usage_events_user_ts ON usage_events(user_id, ts);
CREATE INDEX usage_events_key_ts ON usage_events(key_id, ts);
-- user_id 0 / key_id 0 hold calls made without a user or key.
CREATE TABLE usage_daily (
  day TEXT NOT NULL,
  user_id INTEGER NOT NULL,
  key_id INTEGER NOT NULL,
  model TEXT NOT NULL,
  requests INTEGER NOT NULL,
  counted_requests INTEGER NOT NULL,
  errors INTEGER NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  counted_tokens INTEGER NOT NULL,
  PRIMARY KEY (day, user_id, key_id, model)
) WITHOUT ROWID;
-- Bumped by triggers on every change to users, keys or settings, whichever
-- connection or process makes it, so keys_version() does not move when only
-- usage is written.
CREATE TABLE access_generation (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  value INTEGER NOT NULL
);
INSERT INTO access_generation (id, value) VALUES (1, 0);
CREATE TRIGGER users_insert AFTER INSERT ON users
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER users_update AFTER UPDATE ON users
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER users_delete AFTER DELETE ON users
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER api_keys_insert AFTER INSERT ON api_keys
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER api_keys_update AFTER UPDATE ON api_keys
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER api_keys_delete AFTER DELETE ON api_keys
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER settings_insert AFTER INSERT ON settings
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER settings_update AFTER UPDATE ON settings
  BEGIN UPDATE access_generation SET value = value + 1; END;
CREATE TRIGGER settings_delete AFTER DELETE ON settings
  BEGIN UPDATE access_generation SET value = value + 1; END;
)sql",
    // One append-mostly index on ts instead of two keyed by user and key: each
    // row costs one cheap B-tree insert fewer, and the only reader of raw rows
    // by time (the quota restore's current minute) reads a range of ts anyway.
    R"sql(
CREATE INDEX usage_events_ts ON usage_events(ts);
DROP INDEX usage_events_user_ts;
DROP INDEX usage_events_key_ts;
)sql",
    // Serverless-style jobs (gateway/jobs.hpp).
    R"sql(
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  endpoint TEXT NOT NULL,
  user_id INTEGER NOT NULL,
  key_id INTEGER NOT NULL,
  state TEXT NOT NULL,
  request TEXT NOT NULL,
  webhook TEXT NOT NULL,
  output TEXT NOT NULL,
  error TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  started_at INTEGER NOT NULL,
  finished_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  execution_timeout_ms INTEGER NOT NULL,
  ttl_ms INTEGER NOT NULL,
  attempts INTEGER NOT NULL
);
CREATE INDEX jobs_state ON jobs(state, created_at);
)sql",
    // Shared quota budgets (store.hpp's BudgetClaim): several processes on one file.
    R"sql(
CREATE TABLE quota_budgets (
  subject TEXT NOT NULL,
  limit_name TEXT NOT NULL,
  window_id INTEGER NOT NULL,
  window_end INTEGER NOT NULL,
  granted INTEGER NOT NULL,
  last_grant INTEGER NOT NULL,
  PRIMARY KEY (subject, limit_name, window_id)
);
CREATE INDEX quota_budgets_end ON quota_budgets(window_end);
)sql",
    // A usage row's request id, for tracing. Not unique here, unlike on
    // PostgreSQL: a SQLite commit is local, and one that fails did not happen,
    // so the writer never writes a batch that is already in.
    R"sql(
ALTER TABLE usage_events ADD COLUMN request_id TEXT;
)sql",
};

// --- UTC windows (the quota limiter's arithmetic, so both agree) -----------

std::string utc_day(EpochMs t) { return day_string(t); }

// First day of t's UTC month and of the month after, as YYYY-MM-DD.
std::pair<std::string, std::string> utc_month_bounds(EpochMs t) {
  return {day_string(t).substr(0, 8) + "01", day_string(next_month_start(t))};
}

// --- sqlite3 helpers -------------------------------------------------------

[[noreturn]] void fail(sqlite3* db, int rc, std::string_view what) {
  std::string message = std::string(what) + ": " + (db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
  // A constraint (duplicate key hash, ...) is the caller's mistake, not the database's.
  if ((rc & 0xff) == SQLITE_CONSTRAINT) throw StoreError(message);
  throw std::runtime_error("sqlite: " + message);
}

// One execution of a cached prepared statement; resets it when done.
class Query {
 public:
  Query(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  ~Query() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  Query(const Query&) = delete;
  Query& operator=(const Query&) = delete;

  sqlite3_stmt* statement() const { return stmt_; }

  Query& bind(int index, std::int64_t value) {
    check(sqlite3_bind_int64(stmt_, index, value));
    return *this;
  }
  Query& bind(int index, std::string_view value) {
    check(sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Query& bind(int index, const std::string& value) { return bind(index, std::string_view(value)); }
  // For text that outlives the statement's execution: bound without a copy.
  Query& bind_static(int index, std::string_view value) {
    check(sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()), SQLITE_STATIC));
    return *this;
  }
  Query& bind(int index, const char* value) { return bind(index, std::string_view(value)); }
  Query& bind(int index, const std::optional<std::int64_t>& value) {
    check(value ? sqlite3_bind_int64(stmt_, index, *value) : sqlite3_bind_null(stmt_, index));
    return *this;
  }
  Query& bind(int index, const std::optional<std::string>& value) {
    return value ? bind(index, std::string_view(*value)) : bind_null(index);
  }
  Query& bind_null(int index) {
    check(sqlite3_bind_null(stmt_, index));
    return *this;
  }
  // Binds the five limit columns at first, first + 1, ...
  Query& bind_limits(int first, const Limits& limits) {
    bind(first, limits.requests_per_minute);
    bind(first + 1, limits.tokens_per_minute);
    bind(first + 2, limits.requests_per_day);
    bind(first + 3, limits.tokens_per_day);
    return bind(first + 4, limits.tokens_per_month);
  }

  // True while there is a row to read.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    fail(db_, rc, sqlite3_sql(stmt_));
  }
  void run() {
    while (step()) {
    }
  }

  std::int64_t int64_at(int column) const { return sqlite3_column_int64(stmt_, column); }
  std::optional<std::int64_t> optional_at(int column) const {
    if (sqlite3_column_type(stmt_, column) == SQLITE_NULL) return std::nullopt;
    return sqlite3_column_int64(stmt_, column);
  }
  std::string text_at(int column) const {
    const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, column));
    return text ? std::string(text, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, column))) : std::string();
  }
  Limits limits_at(int first) const {
    return {optional_at(first), optional_at(first + 1), optional_at(first + 2), optional_at(first + 3),
            optional_at(first + 4)};
  }

 private:
  void check(int rc) {
    if (rc != SQLITE_OK) fail(db_, rc, "bind");
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;
};

User read_user(const Query& q) { return {q.int64_at(0), q.text_at(1), q.int64_at(2), q.limits_at(3)}; }

ApiKey read_key(const Query& q) {
  ApiKey key;
  key.id = q.int64_at(0);
  key.user_id = q.int64_at(1);
  key.user_name = q.text_at(2);
  key.prefix = q.text_at(3);
  key.sha256_hex = q.text_at(4);
  key.created_at = q.int64_at(5);
  key.expires_at = q.optional_at(6);
  key.revoked_at = q.optional_at(7);
  key.models = split_models(q.text_at(8));
  key.limits = q.limits_at(9);
  return key;
}

JobRecord read_job(const Query& q) {
  JobRecord job;
  job.id = q.text_at(0);
  job.endpoint = q.text_at(1);
  job.user_id = q.int64_at(2);
  job.key_id = q.int64_at(3);
  job.state = parse_job_state(q.text_at(4)).value_or(JobState::failed);
  job.request = q.text_at(5);
  job.webhook = q.text_at(6);
  job.output = q.text_at(7);
  job.error = q.text_at(8);
  job.created_at = q.int64_at(9);
  job.started_at = q.int64_at(10);
  job.finished_at = q.int64_at(11);
  job.expires_at = q.int64_at(12);
  job.execution_timeout_ms = q.int64_at(13);
  job.ttl_ms = q.int64_at(14);
  job.attempts = q.int64_at(15);
  return job;
}

class SqliteStore final : public Store {
 public:
  explicit SqliteStore(const std::string& path) {
    const int rc =
        sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    if (rc != SQLITE_OK) {
      std::string message = "sqlite: cannot open " + path + ": " + (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc));
      sqlite3_close(db_);
      throw std::runtime_error(message);
    }
    try {
      sqlite3_busy_timeout(db_, 5000);
      exec("PRAGMA journal_mode = WAL");
      exec("PRAGMA synchronous = NORMAL");
      exec("PRAGMA foreign_keys = ON");
      migrate();
    } catch (...) {
      close();
      throw;
    }
  }

  ~SqliteStore() override { close(); }

  User ensure_user(std::string_view name) override {
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    User user = ensure_user_locked(name);
    tx.commit();
    return user;
  }

  std::optional<User> find_user(std::string_view name) override {
    std::lock_guard lock(mutex_);
    return find_user_locked(name);
  }

  std::vector<User> list_users() override {
    std::lock_guard lock(mutex_);
    std::vector<User> users;
    Query q = query(std::string(kSelectUser) + " ORDER BY name");
    while (q.step()) users.push_back(read_user(q));
    return users;
  }

  void set_user_limits(std::string_view name, const Limits& limits) override {
    std::lock_guard lock(mutex_);
    query(
        "UPDATE users SET rpm = ?2, tpm = ?3, rpd = ?4, tpd = ?5, tokens_per_month = ?6"
        " WHERE name = ?1")
        .bind(1, name)
        .bind_limits(2, limits)
        .run();
    if (sqlite3_changes(db_) == 0) throw StoreError("no user named '" + std::string(name) + "'");
  }

  ApiKey insert_key(const NewKey& key) override {
    if (key.prefix.empty()) throw StoreError("a key needs a prefix");
    if (key.sha256_hex.empty()) throw StoreError("a key needs a hash");
    const std::string models = join_models(key.models);
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const User user = ensure_user_locked(key.user_name);
    std::int64_t id = 0;
    {
      Query q = query(
          "INSERT INTO api_keys (user_id, prefix, sha256, created_at, expires_at, models,"
          " rpm, tpm, rpd, tpd, tokens_per_month)"
          " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id");
      q.bind(1, user.id)
          .bind(2, key.prefix)
          .bind(3, key.sha256_hex)
          .bind(4, now_ms())
          .bind(5, key.expires_at)
          .bind(6, models)
          .bind_limits(7, key.limits);
      if (!q.step()) throw std::runtime_error("sqlite: INSERT ... RETURNING gave no row");
      id = q.int64_at(0);
      q.run();
    }
    ApiKey inserted = key_by_id_locked(id);
    tx.commit();
    return inserted;
  }

  std::vector<ApiKey> list_keys(std::optional<std::string_view> user) override {
    std::lock_guard lock(mutex_);
    std::vector<ApiKey> keys;
    Query q = query(std::string(kSelectKey) + " WHERE ?1 IS NULL OR u.name = ?1 ORDER BY k.id");
    if (user) q.bind(1, *user);
    while (q.step()) keys.push_back(read_key(q));
    return keys;
  }

  std::optional<ApiKey> find_key_by_hash(std::string_view sha256_hex) override {
    std::lock_guard lock(mutex_);
    Query q = query(std::string(kSelectKey) + " WHERE k.sha256 = ?1");
    q.bind(1, sha256_hex);
    if (!q.step()) return std::nullopt;
    return read_key(q);
  }

  ApiKey revoke_key(std::string_view prefix, EpochMs now) override {
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const std::int64_t id = resolve_prefix_locked(prefix);
    query("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1").bind(1, id).bind(2, now).run();
    ApiKey revoked = key_by_id_locked(id);
    tx.commit();
    return revoked;
  }

  void set_key_limits(std::string_view prefix, const Limits& limits) override {
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const std::int64_t id = resolve_prefix_locked(prefix);
    query(
        "UPDATE api_keys SET rpm = ?2, tpm = ?3, rpd = ?4, tpd = ?5, tokens_per_month = ?6"
        " WHERE id = ?1")
        .bind(1, id)
        .bind_limits(2, limits)
        .run();
    tx.commit();
  }

  std::int64_t keys_version() override {
    std::lock_guard lock(mutex_);
    Query q = query("SELECT value FROM access_generation WHERE id = 1");
    if (!q.step()) throw std::runtime_error("sqlite: access_generation row is missing");
    return q.int64_at(0);
  }

  std::optional<std::string> get_setting(std::string_view name) override {
    std::lock_guard lock(mutex_);
    Query q = query("SELECT value FROM settings WHERE name = ?1");
    q.bind(1, name);
    if (!q.step()) return std::nullopt;
    return q.text_at(0);
  }

  void put_setting(std::string_view name, std::string_view value) override {
    std::lock_guard lock(mutex_);
    query(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value")
        .bind(1, name)
        .bind(2, value)
        .run();
  }

  void insert_job(const JobRecord& job) override {
    std::lock_guard lock(mutex_);
    insert_job_locked(job);
  }

  void update_job(const JobRecord& job) override {
    std::lock_guard lock(mutex_);
    update_job_locked(job);
  }

  std::vector<bool> write_jobs(std::span<const JobWrite> writes) override {
    std::lock_guard lock(mutex_);
    std::vector<bool> applied(writes.size(), false);
    Transaction transaction(*this);
    for (std::size_t i = 0; i < writes.size(); ++i) {
      query("SAVEPOINT job_write").run();
      try {
        if (writes[i].insert) {
          insert_job_locked(writes[i].record);
        } else {
          update_job_locked(writes[i].record);
        }
        applied[i] = true;
      } catch (const StoreError&) {
        query("ROLLBACK TO job_write").run();
      }
      query("RELEASE job_write").run();
    }
    transaction.commit();
    return applied;
  }

  std::optional<JobRecord> find_job(std::string_view id) override {
    std::lock_guard lock(mutex_);
    Query q = query(std::string(kSelectJob) + " WHERE id = ?1");
    q.bind(1, id);
    if (!q.step()) return std::nullopt;
    return read_job(q);
  }

  std::vector<JobRecord> unfinished_jobs() override {
    std::lock_guard lock(mutex_);
    Query q = query(std::string(kSelectJob) + " WHERE state IN ('IN_QUEUE', 'IN_PROGRESS') ORDER BY created_at, rowid");
    std::vector<JobRecord> jobs;
    while (q.step()) jobs.push_back(read_job(q));
    return jobs;
  }

  std::int64_t purge_jobs(EpochMs now) override {
    std::lock_guard lock(mutex_);
    query("DELETE FROM jobs WHERE finished_at > 0 AND expires_at <= ?1").bind(1, now).run();
    return sqlite3_changes64(db_);
  }

  BudgetOutcome claim_budgets(std::span<const BudgetClaim> claims) override {
    auto grant = [](const std::string& granted) { return budget_grant_sql(granted, "?5", "?6"); };
    static const std::string sql =
        std::string("INSERT INTO quota_budgets AS b (") + kBudgetColumns + ") VALUES (?1, ?2, ?3, ?4, ?7 + " +
        grant("?7") + ", " + grant("?7") +
        ") ON CONFLICT (subject, limit_name, window_id) DO UPDATE SET last_grant = " + grant("b.granted") +
        ", granted = b.granted + " + grant("b.granted") + " RETURNING last_grant, granted";
    BudgetOutcome outcome;
    outcome.granted.assign(claims.size(), 0);
    outcome.remaining.assign(claims.size(), 0);
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    for (const std::size_t i : budget_order(claims)) {
      const BudgetClaim& c = claims[i];
      std::int64_t granted = 0, total = 0;
      {
        Query q = query(sql);
        q.bind(1, c.subject).bind(2, c.limit_name).bind(3, c.window).bind(4, c.window_end).bind(5, c.limit);
        q.bind(6, c.need).bind(7, std::max<std::int64_t>(0, c.used_before));
        if (!q.step()) throw std::runtime_error("sqlite: INSERT ... RETURNING gave no row");
        granted = q.int64_at(0);
        total = q.int64_at(1);
        q.run();
      }
      if (granted < c.need || granted == 0) {
        BudgetOutcome refused;
        refused.granted.assign(claims.size(), 0);
        refused.remaining.assign(claims.size(), 0);
        refused.remaining[i] = std::max<std::int64_t>(0, c.limit - total);
        refused.refused = i;
        return refused;  // the transaction rolls back: nothing granted
      }
      outcome.granted[i] = granted;
      outcome.remaining[i] = std::max<std::int64_t>(0, c.limit - total);
    }
    tx.commit();
    return outcome;
  }

  void adjust_budgets(std::span<const BudgetAdjustment> adjustments) override {
    static const std::string sql = std::string("INSERT INTO quota_budgets AS b (") + kBudgetColumns +
                                   ") VALUES (?1, ?2, ?3, ?4, MAX(0, ?5), 0)"
                                   " ON CONFLICT (subject, limit_name, window_id) DO UPDATE SET"
                                   " granted = MAX(0, b.granted + ?5)";
    if (adjustments.empty()) return;
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    for (const std::size_t i : budget_order(adjustments)) {
      const BudgetAdjustment& a = adjustments[i];
      query(sql)
          .bind(1, a.subject)
          .bind(2, a.limit_name)
          .bind(3, a.window)
          .bind(4, a.window_end)
          .bind(5, a.delta)
          .run();
    }
    tx.commit();
  }

  std::int64_t purge_budgets(EpochMs before) override {
    std::lock_guard lock(mutex_);
    query("DELETE FROM quota_budgets WHERE window_end < ?1").bind(1, before).run();
    return sqlite3_changes64(db_);
  }

  void append_usage(std::span<const UsageEvent> events) override {
    if (events.empty()) return;
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    for (std::size_t at = 0; at < events.size(); at += kRowsPerInsert) {
      insert_usage_rows(events.subspan(at, std::min(kRowsPerInsert, events.size() - at)));
    }
    add_daily_rows(daily_rollup(events));
    tx.commit();
  }

  // Adds a batch's daily totals to usage_daily.
  void add_daily_rows(const std::map<DailyKey, DailyTotals>& daily) {
    for (const auto& [k, t] : daily) {
      query(
          "INSERT INTO usage_daily (day, user_id, key_id, model, requests, counted_requests,"
          " errors, prompt_tokens, completion_tokens, counted_tokens)"
          " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
          " ON CONFLICT (day, user_id, key_id, model) DO UPDATE SET"
          " requests = requests + excluded.requests,"
          " counted_requests = counted_requests + excluded.counted_requests,"
          " errors = errors + excluded.errors,"
          " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
          " completion_tokens = completion_tokens + excluded.completion_tokens,"
          " counted_tokens = counted_tokens + excluded.counted_tokens")
          .bind(1, k.day)
          .bind(2, k.user_id)
          .bind(3, k.key_id)
          .bind(4, k.model)
          .bind(5, t.requests)
          .bind(6, t.counted_requests)
          .bind(7, t.errors)
          .bind(8, t.prompt_tokens)
          .bind(9, t.completion_tokens)
          .bind(10, t.counted_tokens)
          .run();
    }
  }

  std::vector<UsageRow> usage(const UsageQuery& request) override {
    std::string sql = std::string("SELECT u.name, ") + (request.by_day ? "d.day" : "''") + ", " +
                      (request.by_model ? "d.model" : "''") +
                      ", SUM(d.requests), SUM(d.errors), SUM(d.prompt_tokens),"
                      " SUM(d.completion_tokens)"
                      " FROM usage_daily d JOIN users u ON u.id = d.user_id"
                      " WHERE (?1 IS NULL OR u.name = ?1) AND (?2 IS NULL OR d.day >= ?2)"
                      " GROUP BY u.id";
    if (request.by_day) sql += ", d.day";
    if (request.by_model) sql += ", d.model";
    sql += " ORDER BY u.name";
    if (request.by_day) sql += ", d.day";
    if (request.by_model) sql += ", d.model";

    std::lock_guard lock(mutex_);
    std::vector<UsageRow> rows;
    Query q = query(sql);
    q.bind(1, request.user);
    if (request.since) q.bind(2, utc_day(*request.since));
    while (q.step()) {
      rows.push_back(
          {q.text_at(0), q.text_at(1), q.text_at(2), q.int64_at(3), q.int64_at(4), q.int64_at(5), q.int64_at(6)});
    }
    return rows;
  }

  std::int64_t count_usage_events() override {
    std::lock_guard lock(mutex_);
    Query q = query("SELECT COUNT(*) FROM usage_events");
    q.step();
    return q.int64_at(0);
  }

  QuotaState quota_state(EpochMs now) override {
    const EpochMs minute_start = minute_index(now) * 60'000;
    const std::string today = utc_day(now);
    const auto [month_first, next_month_first] = utc_month_bounds(now);

    std::lock_guard lock(mutex_);
    // One read transaction so the windows agree with each other.
    query("BEGIN").run();
    QuotaState state;
    try {
      // The current minute's rows, found through the ts index.
      read_windows(
          "SELECT user_id, COUNT(*), SUM(prompt_tokens + completion_tokens) FROM usage_events"
          " WHERE ts >= ?1 AND ts < ?2 AND counted = 1 AND user_id IS NOT NULL GROUP BY user_id",
          minute_start, next_minute_start(now), state.users, &SubjectUsage::minute);
      read_windows(
          "SELECT key_id, COUNT(*), SUM(prompt_tokens + completion_tokens) FROM usage_events"
          " WHERE ts >= ?1 AND ts < ?2 AND counted = 1 AND key_id IS NOT NULL GROUP BY key_id",
          minute_start, next_minute_start(now), state.keys, &SubjectUsage::minute);
      read_windows(
          "SELECT user_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
          " WHERE day >= ?1 AND day <= ?2 AND user_id <> 0 GROUP BY user_id",
          today, today, state.users, &SubjectUsage::day);
      read_windows(
          "SELECT key_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
          " WHERE day >= ?1 AND day <= ?2 AND key_id <> 0 GROUP BY key_id",
          today, today, state.keys, &SubjectUsage::day);
      read_windows(
          "SELECT user_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
          " WHERE day >= ?1 AND day < ?2 AND user_id <> 0 GROUP BY user_id",
          month_first, next_month_first, state.users, &SubjectUsage::month);
      read_windows(
          "SELECT key_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
          " WHERE day >= ?1 AND day < ?2 AND key_id <> 0 GROUP BY key_id",
          month_first, next_month_first, state.keys, &SubjectUsage::month);
    } catch (...) {
      rollback_quietly();
      throw;
    }
    query("COMMIT").run();
    return state;
  }

 private:
  void insert_job_locked(const JobRecord& job) {
    query(
        "INSERT INTO jobs (id, endpoint, user_id, key_id, state, request, webhook, output, error, created_at,"
        " started_at, finished_at, expires_at, execution_timeout_ms, ttl_ms, attempts)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)")
        .bind(1, job.id)
        .bind(2, job.endpoint)
        .bind(3, job.user_id)
        .bind(4, job.key_id)
        .bind(5, job_state_name(job.state))
        .bind(6, job.request)
        .bind(7, job.webhook)
        .bind(8, job.output)
        .bind(9, job.error)
        .bind(10, job.created_at)
        .bind(11, job.started_at)
        .bind(12, job.finished_at)
        .bind(13, job.expires_at)
        .bind(14, job.execution_timeout_ms)
        .bind(15, job.ttl_ms)
        .bind(16, job.attempts)
        .run();
  }

  void update_job_locked(const JobRecord& job) {
    query(
        "UPDATE jobs SET state = ?2, webhook = ?3, output = ?4, error = ?5, started_at = ?6, finished_at = ?7,"
        " expires_at = ?8, execution_timeout_ms = ?9, ttl_ms = ?10, attempts = ?11 WHERE id = ?1")
        .bind(1, job.id)
        .bind(2, job_state_name(job.state))
        .bind(3, job.webhook)
        .bind(4, job.output)
        .bind(5, job.error)
        .bind(6, job.started_at)
        .bind(7, job.finished_at)
        .bind(8, job.expires_at)
        .bind(9, job.execution_timeout_ms)
        .bind(10, job.ttl_ms)
        .bind(11, job.attempts)
        .run();
  }

  // BEGIN IMMEDIATE on construction, ROLLBACK unless committed.
  class Transaction {
   public:
    explicit Transaction(SqliteStore& store) : store_(store) { store_.query("BEGIN IMMEDIATE").run(); }
    ~Transaction() {
      if (!committed_) store_.rollback_quietly();
    }
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit() {
      store_.query("COMMIT").run();
      committed_ = true;
    }

   private:
    SqliteStore& store_;
    bool committed_ = false;
  };

  void exec(const char* sql) {
    char* error = nullptr;
    const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &error);
    if (rc != SQLITE_OK) {
      std::string message = error ? error : sqlite3_errstr(rc);
      sqlite3_free(error);
      throw std::runtime_error("sqlite: " + message);
    }
  }

  std::int64_t user_version() {
    Query q = query("PRAGMA user_version");
    q.step();
    return q.int64_at(0);
  }

  void migrate() {
    const auto latest = static_cast<std::int64_t>(std::size(kMigrations));
    while (true) {
      Transaction tx(*this);
      // Read inside the write transaction: another process may be migrating too.
      const std::int64_t version = user_version();
      if (version > latest) {
        throw std::runtime_error("sqlite: database schema version " + std::to_string(version) +
                                 " is newer than this build (" + std::to_string(latest) + ")");
      }
      if (version == latest) return;
      exec(kMigrations[version]);
      exec(("PRAGMA user_version = " + std::to_string(version + 1)).c_str());
      tx.commit();
    }
  }

  // The cached prepared statement for `sql`, ready for one execution.
  Query query(const std::string& sql) {
    auto it = statements_.find(sql);
    if (it == statements_.end()) {
      sqlite3_stmt* stmt = nullptr;
      const int rc =
          sqlite3_prepare_v3(db_, sql.c_str(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
      if (rc != SQLITE_OK) fail(db_, rc, "prepare " + sql);
      it = statements_.emplace(sql, stmt).first;
    }
    return Query(db_, it->second);
  }

  void rollback_quietly() {
    if (!sqlite3_get_autocommit(db_)) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }

  void close() {
    for (auto& [sql, stmt] : statements_) sqlite3_finalize(stmt);
    statements_.clear();
    insert_usage_stmt_.fill(nullptr);
    sqlite3_close(db_);
    db_ = nullptr;
  }

  std::optional<User> find_user_locked(std::string_view name) {
    Query q = query(std::string(kSelectUser) + " WHERE name = ?1");
    q.bind(1, name);
    if (!q.step()) return std::nullopt;
    return read_user(q);
  }

  // Every caller validates names first; this is the last line of defence.
  User ensure_user_locked(std::string_view name) {
    if (auto problem = user_name_problem(name)) throw StoreError(*problem);
    query("INSERT INTO users (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING")
        .bind(1, name)
        .bind(2, now_ms())
        .run();
    auto user = find_user_locked(name);
    if (!user) throw std::runtime_error("sqlite: user vanished after insert");
    return *user;
  }

  ApiKey key_by_id_locked(std::int64_t id) {
    Query q = query(std::string(kSelectKey) + " WHERE k.id = ?1");
    q.bind(1, id);
    if (!q.step()) throw std::runtime_error("sqlite: key vanished");
    return read_key(q);
  }

  // The id of the one unrevoked key whose prefix starts with `prefix`.
  std::int64_t resolve_prefix_locked(std::string_view prefix) {
    const std::string shown(prefix);
    if (prefix.empty()) throw StoreError("an empty prefix matches every key");
    Query q = query(
        "SELECT id, revoked_at IS NULL FROM api_keys"
        " WHERE substr(prefix, 1, length(?1)) = ?1 ORDER BY id");
    q.bind(1, prefix);
    std::int64_t matches = 0;
    std::int64_t active = 0;
    std::int64_t id = 0;
    while (q.step()) {
      ++matches;
      if (q.int64_at(1)) {
        ++active;
        id = q.int64_at(0);
      }
    }
    if (matches == 0) throw StoreError("no key with prefix " + shown);
    if (active == 0) throw StoreError("key " + shown + " is already revoked");
    if (active > 1) {
      throw StoreError("prefix " + shown + " is ambiguous: " + std::to_string(active) + " keys");
    }
    return id;
  }

  // Rows per INSERT: executing a statement costs more than the row it adds.
  static constexpr std::size_t kRowsPerInsert = 32;
  static constexpr int kUsageColumns = 14;

  void insert_usage_rows(std::span<const UsageEvent> rows) {
    sqlite3_stmt*& stmt = insert_usage_stmt_[rows.size()];
    if (!stmt) {
      std::string sql =
          "INSERT INTO usage_events (ts, user_id, key_id, route, model, backend, status,"
          " prompt_tokens, completion_tokens, latency_us, ttft_us, counted, estimated, request_id) VALUES ";
      for (std::size_t r = 0; r < rows.size(); ++r) {
        sql += r == 0 ? "(" : ", (";
        for (int c = 0; c < kUsageColumns; ++c) sql += c == 0 ? "?" : ", ?";
        sql += ')';
      }
      stmt = query(sql).statement();  // prepared once, owned by the statement cache
    }
    Query q(db_, stmt);
    int b = 0;  // the row's first parameter is b + 1
    for (const UsageEvent& e : rows) {
      // The events outlive the statement's execution: no copies of the text.
      // Each text is cut to its bound whatever the caller did, so no client
      // string can grow the file faster than its row count.
      q.bind(b + 1, e.ts)
          .bind(b + 2, e.user_id)
          .bind(b + 3, e.key_id)
          .bind_static(b + 4, truncate_utf8(e.route, kMaxStoredRoute))
          .bind_static(b + 5, truncate_utf8(e.model, kMaxStoredName))
          .bind_static(b + 6, truncate_utf8(e.backend, kMaxStoredName))
          .bind(b + 7, std::int64_t{e.status})
          .bind(b + 8, e.prompt_tokens)
          .bind(b + 9, e.completion_tokens)
          .bind(b + 10, e.latency_us)
          .bind(b + 11, e.ttft_us)
          .bind(b + 12, std::int64_t{e.counted})
          .bind(b + 13, std::int64_t{e.estimated});
      if (e.request_id.empty()) {
        q.bind_null(b + 14);
      } else {
        q.bind_static(b + 14, truncate_utf8(e.request_id, kMaxStoredName));
      }
      b += kUsageColumns;
    }
    q.run();
  }

  template <typename Bound>
  void read_windows(const std::string& sql, const Bound& from, const Bound& to,
                    std::map<std::int64_t, SubjectUsage>& out, WindowCounts SubjectUsage::*window) {
    Query q = query(sql);
    q.bind(1, from).bind(2, to);
    while (q.step()) {
      WindowCounts& counts = out[q.int64_at(0)].*window;
      counts.requests = q.int64_at(1);
      counts.tokens = q.int64_at(2);
    }
  }

  std::mutex mutex_;
  sqlite3* db_ = nullptr;
  std::unordered_map<std::string, sqlite3_stmt*> statements_;
  std::array<sqlite3_stmt*, kRowsPerInsert + 1> insert_usage_stmt_{};  // by row count, prepared on first use
};

}  // namespace

std::unique_ptr<Store> open_sqlite_store(const std::string& path) { return std::make_unique<SqliteStore>(path); }

}  // namespace tollgate::metering
