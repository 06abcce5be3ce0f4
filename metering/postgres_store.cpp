// The shared metering store: PostgreSQL through libpq, one connection per
// object (the object serialises its own calls, as the SQLite store does).
//
// Written for replicas that share one database, and for PgBouncer in
// transaction mode: no session state outlives a transaction (no named prepared
// statements, no SET), every statement is sent with its parameters as text
// (PQexecParams), and a connection that broke is reset before the next call.
// The schema is migrated at open under an advisory lock, so replicas that start
// together migrate once.
#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "metering/postgres_wire.hpp"
#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "metering/store_rows.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::metering {
namespace {

using pg::Params;
using pg::redacted;
using pg::Result;

// Ordered schema migrations: step i brings the database to version i + 1
// (kept in tollgate_schema). A schema change appends a step; steps never change.
constexpr const char* kMigrations[] = {
    R"sql(
CREATE TABLE users (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL,
  rpm BIGINT, tpm BIGINT, rpd BIGINT, tpd BIGINT, tokens_per_month BIGINT
);
CREATE TABLE api_keys (
  id BIGSERIAL PRIMARY KEY,
  user_id BIGINT NOT NULL REFERENCES users(id),
  prefix TEXT NOT NULL,
  sha256 TEXT NOT NULL UNIQUE,
  created_at BIGINT NOT NULL,
  expires_at BIGINT,
  revoked_at BIGINT,
  models TEXT NOT NULL DEFAULT '',
  rpm BIGINT, tpm BIGINT, rpd BIGINT, tpd BIGINT, tokens_per_month BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);
CREATE TABLE settings (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE usage_events (
  id BIGSERIAL PRIMARY KEY,
  ts BIGINT NOT NULL,
  user_id BIGINT,
  key_id BIGINT,
  route TEXT NOT NULL,
  model TEXT NOT NULL,
  backend TEXT NOT NULL,
  status INTEGER NOT NULL,
  prompt_tokens BIGINT NOT NULL,
  completion_tokens BIGINT NOT NULL,
  latency_us BIGINT NOT NULL,
  ttft_us BIGINT,
  counted SMALLINT NOT NULL,
  estimated SMALLINT NOT NULL
);
CREATE INDEX usage_events_ts ON usage_events(ts);
-- user_id 0 / key_id 0 hold calls made without a user or key.
CREATE TABLE usage_daily (
  day TEXT NOT NULL,
  user_id BIGINT NOT NULL,
  key_id BIGINT NOT NULL,
  model TEXT NOT NULL,
  requests BIGINT NOT NULL,
  counted_requests BIGINT NOT NULL,
  errors BIGINT NOT NULL,
  prompt_tokens BIGINT NOT NULL,
  completion_tokens BIGINT NOT NULL,
  counted_tokens BIGINT NOT NULL,
  PRIMARY KEY (day, user_id, key_id, model)
);
-- Bumped by row triggers on every change to users, keys or settings, from any
-- replica, so keys_version() does not move when only usage is written.
CREATE TABLE access_generation (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  value BIGINT NOT NULL
);
INSERT INTO access_generation (id, value) VALUES (1, 0);
CREATE FUNCTION tollgate_access_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE access_generation SET value = value + 1;
  RETURN NULL;
END
$$;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION tollgate_access_changed();
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION tollgate_access_changed();
CREATE TRIGGER settings_changed AFTER INSERT OR UPDATE OR DELETE ON settings
  FOR EACH ROW EXECUTE FUNCTION tollgate_access_changed();
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  endpoint TEXT NOT NULL,
  user_id BIGINT NOT NULL,
  key_id BIGINT NOT NULL,
  state TEXT NOT NULL,
  request TEXT NOT NULL,
  webhook TEXT NOT NULL,
  output TEXT NOT NULL,
  error TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  started_at BIGINT NOT NULL,
  finished_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  execution_timeout_ms BIGINT NOT NULL,
  ttl_ms BIGINT NOT NULL,
  attempts BIGINT NOT NULL
);
CREATE INDEX jobs_state ON jobs(state, created_at);
)sql",
    // Shared quota budgets (store.hpp's BudgetClaim).
    R"sql(
CREATE TABLE quota_budgets (
  subject TEXT NOT NULL,
  limit_name TEXT NOT NULL,
  window_id BIGINT NOT NULL,
  window_end BIGINT NOT NULL,
  granted BIGINT NOT NULL,
  last_grant BIGINT NOT NULL,
  PRIMARY KEY (subject, limit_name, window_id)
);
CREATE INDEX quota_budgets_end ON quota_budgets(window_end);
)sql",
    // Changes to users, keys and settings are announced as they commit
    // (LISTEN tollgate_access), so replicas need not wait for their poll.
    R"sql(
CREATE OR REPLACE FUNCTION tollgate_access_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE access_generation SET value = value + 1;
  PERFORM pg_notify('tollgate_access', '');
  RETURN NULL;
END
$$;
)sql",
    // A usage row's request id: a batch written again after a commit whose
    // outcome was lost is stored once (rows from before have none).
    R"sql(
ALTER TABLE usage_events ADD COLUMN request_id TEXT;
CREATE UNIQUE INDEX usage_events_request ON usage_events(request_id);
)sql",
};

// Any number; the same in every replica, so they take the same lock.
constexpr std::int64_t kMigrationLock = 0x746f6c6c67617465;  // "tollgate"

User read_user(const Result& r, int row) {
  return {r.int64_at(row, 0), r.text_at(row, 1), r.int64_at(row, 2), r.limits_at(row, 3)};
}

ApiKey read_key(const Result& r, int row) {
  ApiKey key;
  key.id = r.int64_at(row, 0);
  key.user_id = r.int64_at(row, 1);
  key.user_name = r.text_at(row, 2);
  key.prefix = r.text_at(row, 3);
  key.sha256_hex = r.text_at(row, 4);
  key.created_at = r.int64_at(row, 5);
  key.expires_at = r.optional_at(row, 6);
  key.revoked_at = r.optional_at(row, 7);
  key.models = split_models(r.text_at(row, 8));
  key.limits = r.limits_at(row, 9);
  return key;
}

JobRecord read_job(const Result& r, int row) {
  JobRecord job;
  job.id = r.text_at(row, 0);
  job.endpoint = r.text_at(row, 1);
  job.user_id = r.int64_at(row, 2);
  job.key_id = r.int64_at(row, 3);
  job.state = parse_job_state(r.text_at(row, 4)).value_or(JobState::failed);
  job.request = r.text_at(row, 5);
  job.webhook = r.text_at(row, 6);
  job.output = r.text_at(row, 7);
  job.error = r.text_at(row, 8);
  job.created_at = r.int64_at(row, 9);
  job.started_at = r.int64_at(row, 10);
  job.finished_at = r.int64_at(row, 11);
  job.expires_at = r.int64_at(row, 12);
  job.execution_timeout_ms = r.int64_at(row, 13);
  job.ttl_ms = r.int64_at(row, 14);
  job.attempts = r.int64_at(row, 15);
  return job;
}

class PostgresStore final : public Store {
 public:
  explicit PostgresStore(std::string url) : url_(std::move(url)) {
    connect();
    try {
      migrate();
    } catch (...) {
      PQfinish(conn_);  // no destructor runs for an object that was never made
      throw;
    }
  }

  ~PostgresStore() override {
    if (conn_) PQfinish(conn_);
  }

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
    Result r = run(std::string(kSelectUser) + " ORDER BY name");
    std::vector<User> users;
    for (int i = 0; i < r.rows(); ++i) users.push_back(read_user(r, i));
    return users;
  }

  void set_user_limits(std::string_view name, const Limits& limits) override {
    std::lock_guard lock(mutex_);
    Result r = run("UPDATE users SET rpm = $2, tpm = $3, rpd = $4, tpd = $5, tokens_per_month = $6 WHERE name = $1",
                   Params().add(name).add_limits(limits));
    if (r.affected() == 0) throw StoreError("no user named '" + std::string(name) + "'");
  }

  ApiKey insert_key(const NewKey& key) override {
    if (key.prefix.empty()) throw StoreError("a key needs a prefix");
    if (key.sha256_hex.empty()) throw StoreError("a key needs a hash");
    const std::string models = join_models(key.models);
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const User user = ensure_user_locked(key.user_name);
    Result r =
        run("INSERT INTO api_keys (user_id, prefix, sha256, created_at, expires_at, models,"
            " rpm, tpm, rpd, tpd, tokens_per_month)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
            Params()
                .add(user.id)
                .add(key.prefix)
                .add(key.sha256_hex)
                .add(now_ms())
                .add(key.expires_at)
                .add(models)
                .add_limits(key.limits));
    if (r.rows() != 1) throw std::runtime_error("postgresql: INSERT ... RETURNING gave no row");
    ApiKey inserted = key_by_id_locked(r.int64_at(0, 0));
    tx.commit();
    return inserted;
  }

  std::vector<ApiKey> list_keys(std::optional<std::string_view> user) override {
    std::lock_guard lock(mutex_);
    Params params;
    params.add(user ? std::optional<std::string>(std::string(*user)) : std::nullopt);
    Result r = run(std::string(kSelectKey) + " WHERE $1::text IS NULL OR u.name = $1 ORDER BY k.id", params);
    std::vector<ApiKey> keys;
    for (int i = 0; i < r.rows(); ++i) keys.push_back(read_key(r, i));
    return keys;
  }

  std::optional<ApiKey> find_key_by_hash(std::string_view sha256_hex) override {
    std::lock_guard lock(mutex_);
    Result r = run(std::string(kSelectKey) + " WHERE k.sha256 = $1", Params().add(sha256_hex));
    if (r.rows() == 0) return std::nullopt;
    return read_key(r, 0);
  }

  ApiKey revoke_key(std::string_view prefix, EpochMs now) override {
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const std::int64_t id = resolve_prefix_locked(prefix);
    run("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", Params().add(id).add(now));
    ApiKey revoked = key_by_id_locked(id);
    tx.commit();
    return revoked;
  }

  void set_key_limits(std::string_view prefix, const Limits& limits) override {
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    const std::int64_t id = resolve_prefix_locked(prefix);
    run("UPDATE api_keys SET rpm = $2, tpm = $3, rpd = $4, tpd = $5, tokens_per_month = $6 WHERE id = $1",
        Params().add(id).add_limits(limits));
    tx.commit();
  }

  std::int64_t keys_version() override {
    std::lock_guard lock(mutex_);
    Result r = run("SELECT value FROM access_generation WHERE id = 1");
    if (r.rows() != 1) throw std::runtime_error("postgresql: access_generation row is missing");
    return r.int64_at(0, 0);
  }

  bool announces_access_changes() const override { return true; }

  bool wait_for_access_change(std::chrono::milliseconds timeout) override {
    int socket = -1;
    {
      std::lock_guard lock(mutex_);
      ensure_connected();
      // Session state, unlike everything else here: behind PgBouncer's
      // transaction mode no announcement arrives, and readers fall back on
      // their poll of keys_version.
      if (!listening_) {
        run("LISTEN tollgate_access");
        listening_ = true;
      }
      if (take_notifications()) return true;
      socket = PQsocket(conn_);
    }
    // Without the lock: the other calls on this connection go on meanwhile
    // (and any announcement they read is kept for take_notifications).
    pollfd ready{socket, POLLIN, 0};
    ::poll(&ready, 1, static_cast<int>(std::max<std::int64_t>(0, timeout.count())));
    std::lock_guard lock(mutex_);
    return conn_ && take_notifications();
  }

  std::optional<std::string> get_setting(std::string_view name) override {
    std::lock_guard lock(mutex_);
    Result r = run("SELECT value FROM settings WHERE name = $1", Params().add(name));
    if (r.rows() == 0) return std::nullopt;
    return r.text_at(0, 0);
  }

  void put_setting(std::string_view name, std::string_view value) override {
    std::lock_guard lock(mutex_);
    run("INSERT INTO settings (name, value) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        Params().add(name).add(value));
  }

  void append_usage(std::span<const UsageEvent> events) override {
    if (events.empty()) return;
    std::lock_guard lock(mutex_);
    try {
      Transaction tx(*this);
      insert_usage_rows(events, "usage_events");
      add_daily_rows(daily_rollup(events));
      tx.commit();
      return;
    } catch (const StoreError&) {
      // A request id is there already: this batch, or part of it, was
      // committed before (the commit's answer was lost). Again, row by row.
    }
    Transaction tx(*this);
    run("CREATE TEMP TABLE usage_incoming (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DROP");
    insert_usage_rows(events, "usage_incoming");
    Result inserted = run("INSERT INTO usage_events (" + std::string(kUsageColumns) + ") SELECT " + kUsageColumns +
                          " FROM usage_incoming ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
    std::set<std::string> fresh;
    for (int i = 0; i < inserted.rows(); ++i) fresh.insert(inserted.text_at(i, 0));
    std::vector<UsageEvent> new_rows;
    for (const UsageEvent& e : events) {
      // Erased as it is used: a batch naming one id twice stored it once.
      if (e.request_id.empty() || fresh.erase(std::string(truncate_utf8(e.request_id, kMaxStoredName))) == 1) {
        new_rows.push_back(e);
      }
    }
    if (!new_rows.empty()) add_daily_rows(daily_rollup(new_rows));
    tx.commit();
  }

  // Adds a batch's daily totals to usage_daily: one multi-row upsert (the keys are distinct).
  void add_daily_rows(const std::map<DailyKey, DailyTotals>& daily) {
    std::string sql =
        "INSERT INTO usage_daily (day, user_id, key_id, model, requests, counted_requests,"
        " errors, prompt_tokens, completion_tokens, counted_tokens) VALUES ";
    Params params;
    int n = 0;
    for (const auto& [k, t] : daily) {
      sql += n == 0 ? "(" : ", (";
      for (int c = 0; c < 10; ++c) sql += (c ? ", $" : "$") + std::to_string(n * 10 + c + 1);
      sql += ')';
      params.add(k.day).add(k.user_id).add(k.key_id).add(k.model);
      params.add(t.requests).add(t.counted_requests).add(t.errors);
      params.add(t.prompt_tokens).add(t.completion_tokens).add(t.counted_tokens);
      ++n;
    }
    sql +=
        " ON CONFLICT (day, user_id, key_id, model) DO UPDATE SET"
        " requests = usage_daily.requests + excluded.requests,"
        " counted_requests = usage_daily.counted_requests + excluded.counted_requests,"
        " errors = usage_daily.errors + excluded.errors,"
        " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
        " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
        " counted_tokens = usage_daily.counted_tokens + excluded.counted_tokens";
    run(sql, params);
  }

  std::vector<UsageRow> usage(const UsageQuery& request) override {
    std::string sql = std::string("SELECT u.name, ") + (request.by_day ? "d.day" : "''") + ", " +
                      (request.by_model ? "d.model" : "''") +
                      ", SUM(d.requests), SUM(d.errors), SUM(d.prompt_tokens), SUM(d.completion_tokens)"
                      " FROM usage_daily d JOIN users u ON u.id = d.user_id"
                      " WHERE ($1::text IS NULL OR u.name = $1) AND ($2::text IS NULL OR d.day >= $2)"
                      " GROUP BY u.id";
    if (request.by_day) sql += ", d.day";
    if (request.by_model) sql += ", d.model";
    sql += " ORDER BY u.name";
    if (request.by_day) sql += ", d.day";
    if (request.by_model) sql += ", d.model";
    Params params;
    params.add(request.user);
    params.add(request.since ? std::optional<std::string>(day_string(*request.since)) : std::nullopt);

    std::lock_guard lock(mutex_);
    Result r = run(sql, params);
    std::vector<UsageRow> rows;
    for (int i = 0; i < r.rows(); ++i) {
      rows.push_back({r.text_at(i, 0), r.text_at(i, 1), r.text_at(i, 2), r.int64_at(i, 3), r.int64_at(i, 4),
                      r.int64_at(i, 5), r.int64_at(i, 6)});
    }
    return rows;
  }

  std::int64_t count_usage_events() override {
    std::lock_guard lock(mutex_);
    return run("SELECT COUNT(*) FROM usage_events").int64_at(0, 0);
  }

  QuotaState quota_state(EpochMs now) override {
    const EpochMs minute_start = minute_index(now) * 60'000;
    const std::string today = day_string(now);
    const std::string month_first = today.substr(0, 8) + "01";
    const std::string next_month_first = day_string(next_month_start(now));

    std::lock_guard lock(mutex_);
    // One snapshot so the windows agree with each other.
    Transaction tx(*this, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    QuotaState state;
    const std::int64_t next_minute = next_minute_start(now);
    read_windows(
        "SELECT user_id, COUNT(*), SUM(prompt_tokens + completion_tokens) FROM usage_events"
        " WHERE ts >= $1 AND ts < $2 AND counted = 1 AND user_id IS NOT NULL GROUP BY user_id",
        Params().add(minute_start).add(next_minute), state.users, &SubjectUsage::minute);
    read_windows(
        "SELECT key_id, COUNT(*), SUM(prompt_tokens + completion_tokens) FROM usage_events"
        " WHERE ts >= $1 AND ts < $2 AND counted = 1 AND key_id IS NOT NULL GROUP BY key_id",
        Params().add(minute_start).add(next_minute), state.keys, &SubjectUsage::minute);
    read_windows(
        "SELECT user_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
        " WHERE day >= $1 AND day <= $2 AND user_id <> 0 GROUP BY user_id",
        Params().add(today).add(today), state.users, &SubjectUsage::day);
    read_windows(
        "SELECT key_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
        " WHERE day >= $1 AND day <= $2 AND key_id <> 0 GROUP BY key_id",
        Params().add(today).add(today), state.keys, &SubjectUsage::day);
    read_windows(
        "SELECT user_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
        " WHERE day >= $1 AND day < $2 AND user_id <> 0 GROUP BY user_id",
        Params().add(month_first).add(next_month_first), state.users, &SubjectUsage::month);
    read_windows(
        "SELECT key_id, SUM(counted_requests), SUM(counted_tokens) FROM usage_daily"
        " WHERE day >= $1 AND day < $2 AND key_id <> 0 GROUP BY key_id",
        Params().add(month_first).add(next_month_first), state.keys, &SubjectUsage::month);
    tx.commit();
    return state;
  }

  BudgetOutcome claim_budgets(std::span<const BudgetClaim> claims) override {
    static const std::string sql =
        std::string("INSERT INTO quota_budgets AS b (") + kBudgetColumns + ") VALUES ($1, $2, $3, $4, $7::bigint + " +
        grant("$7::bigint") + ", " + grant("$7::bigint") +
        ") ON CONFLICT (subject, limit_name, window_id) DO UPDATE SET last_grant = " + grant("b.granted") +
        ", granted = b.granted + " + grant("b.granted") + " RETURNING last_grant, granted";
    BudgetOutcome outcome;
    outcome.granted.assign(claims.size(), 0);
    outcome.remaining.assign(claims.size(), 0);
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    for (const std::size_t i : budget_order(claims)) {
      const BudgetClaim& c = claims[i];
      Result r = run(sql, Params()
                              .add(c.subject)
                              .add(c.limit_name)
                              .add(c.window)
                              .add(c.window_end)
                              .add(c.limit)
                              .add(c.need)
                              .add(std::max<std::int64_t>(0, c.used_before)));
      const std::int64_t granted = r.int64_at(0, 0);
      if (granted < c.need || granted == 0) {
        BudgetOutcome refused;
        refused.granted.assign(claims.size(), 0);
        refused.remaining.assign(claims.size(), 0);
        refused.remaining[i] = std::max<std::int64_t>(0, c.limit - r.int64_at(0, 1));
        refused.refused = i;
        return refused;  // the transaction rolls back: nothing granted
      }
      outcome.granted[i] = granted;
      outcome.remaining[i] = std::max<std::int64_t>(0, c.limit - r.int64_at(0, 1));
    }
    tx.commit();
    return outcome;
  }

  void adjust_budgets(std::span<const BudgetAdjustment> adjustments) override {
    static const std::string sql = std::string("INSERT INTO quota_budgets AS b (") + kBudgetColumns +
                                   ") VALUES ($1, $2, $3, $4, GREATEST(0, $5::bigint), 0)"
                                   " ON CONFLICT (subject, limit_name, window_id) DO UPDATE SET"
                                   " granted = GREATEST(0, b.granted + $5::bigint)";
    if (adjustments.empty()) return;
    std::lock_guard lock(mutex_);
    Transaction tx(*this);
    for (const std::size_t i : budget_order(adjustments)) {
      const BudgetAdjustment& a = adjustments[i];
      run(sql, Params().add(a.subject).add(a.limit_name).add(a.window).add(a.window_end).add(a.delta));
    }
    tx.commit();
  }

  std::int64_t purge_budgets(EpochMs before) override {
    std::lock_guard lock(mutex_);
    return run("DELETE FROM quota_budgets WHERE window_end < $1", Params().add(before)).affected();
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
    Transaction tx(*this);
    for (std::size_t i = 0; i < writes.size(); ++i) {
      run("SAVEPOINT job_write");
      try {
        if (writes[i].insert) {
          insert_job_locked(writes[i].record);
        } else {
          update_job_locked(writes[i].record);
        }
        applied[i] = true;
      } catch (const StoreError&) {
        run("ROLLBACK TO SAVEPOINT job_write");
      }
      run("RELEASE SAVEPOINT job_write");
    }
    tx.commit();
    return applied;
  }

  std::optional<JobRecord> find_job(std::string_view id) override {
    std::lock_guard lock(mutex_);
    Result r = run(std::string(kSelectJob) + " WHERE id = $1", Params().add(id));
    if (r.rows() == 0) return std::nullopt;
    return read_job(r, 0);
  }

  std::vector<JobRecord> unfinished_jobs() override {
    std::lock_guard lock(mutex_);
    Result r = run(std::string(kSelectJob) + " WHERE state IN ('IN_QUEUE', 'IN_PROGRESS') ORDER BY created_at, id");
    std::vector<JobRecord> jobs;
    for (int i = 0; i < r.rows(); ++i) jobs.push_back(read_job(r, i));
    return jobs;
  }

  std::int64_t purge_jobs(EpochMs now) override {
    std::lock_guard lock(mutex_);
    return run("DELETE FROM jobs WHERE finished_at > 0 AND expires_at <= $1", Params().add(now)).affected();
  }

 private:
  static std::string grant(const std::string& granted) { return budget_grant_sql(granted, "$5::bigint", "$6::bigint"); }

  // BEGIN on construction, ROLLBACK unless committed.
  class Transaction {
   public:
    explicit Transaction(PostgresStore& store, const char* begin = "BEGIN") : store_(store) {
      store_.run(begin);
      store_.in_transaction_ = true;
    }
    ~Transaction() {
      if (!committed_) store_.rollback_quietly();
      store_.in_transaction_ = false;
    }
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit() {
      store_.run("COMMIT");
      committed_ = true;
    }

   private:
    PostgresStore& store_;
    bool committed_ = false;
  };

  // Reads what arrived and drops the announcements in it; whether there were any.
  bool take_notifications() {
    if (PQstatus(conn_) != CONNECTION_OK) return false;
    PQconsumeInput(conn_);
    bool any = false;
    while (PGnotify* n = PQnotifies(conn_)) {
      PQfreemem(n);
      any = true;
    }
    return any;
  }

  void connect() {
    listening_ = false;
    // The URL first, then what it may not override: a bounded connect.
    const char* keywords[] = {"dbname", "connect_timeout", "application_name", nullptr};
    const char* values[] = {url_.c_str(), "5", "tollgate", nullptr};
    conn_ = PQconnectdbParams(keywords, values, 1);
    if (!conn_ || PQstatus(conn_) != CONNECTION_OK) {
      std::string message = conn_ ? PQerrorMessage(conn_) : "out of memory";
      while (!message.empty() && message.back() == '\n') message.pop_back();
      if (conn_) PQfinish(conn_);
      conn_ = nullptr;
      throw std::runtime_error("postgresql: cannot connect to " + redacted(url_) + ": " + message);
    }
    // Notices ("already exists, skipping") are not the operator's business.
    PQsetNoticeProcessor(
        conn_, [](void*, const char*) {}, nullptr);
  }

  // A connection that broke (the server restarted, a proxy dropped it) is
  // reset before it is used again; a call that fails meanwhile throws.
  void ensure_connected() {
    if (!conn_) {
      connect();
      return;
    }
    if (PQstatus(conn_) == CONNECTION_OK) return;
    // Not inside a transaction: the statements after the break would run on
    // their own, outside it, and a batch could land in part.
    if (in_transaction_) throw std::runtime_error("postgresql: the connection broke inside a transaction");
    PQreset(conn_);
    listening_ = false;  // a new session listens to nothing
    if (PQstatus(conn_) != CONNECTION_OK) {
      std::string message = PQerrorMessage(conn_);
      while (!message.empty() && message.back() == '\n') message.pop_back();
      throw std::runtime_error("postgresql: cannot reconnect to " + redacted(url_) + ": " + message);
    }
  }

  Result run(const std::string& sql, const Params& params = Params()) {
    ensure_connected();
    const auto values = params.pointers();
    Result result(PQexecParams(conn_, sql.c_str(), params.size(), nullptr, values.data(), nullptr, nullptr, 0));
    check(result);
    return result;
  }

  // A script of several statements without parameters (a migration).
  void run_script(const char* sql) {
    ensure_connected();
    Result result(PQexec(conn_, sql));
    check(result);
  }

  // Throws unless `result` succeeded. A constraint (SQLSTATE class 23: a
  // duplicate key hash or job id) is the caller's mistake, not the database's.
  void check(const Result& result) {
    const auto status = result.get() ? PQresultStatus(result.get()) : PGRES_FATAL_ERROR;
    if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) return;
    std::string message = result.get() ? PQresultErrorMessage(result.get()) : PQerrorMessage(conn_);
    while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
    if (message.empty()) message = PQresStatus(status);
    const char* state = result.get() ? PQresultErrorField(result.get(), PG_DIAG_SQLSTATE) : nullptr;
    if (state && std::string_view(state).starts_with("23")) throw StoreError(message);
    throw std::runtime_error("postgresql: " + message);
  }

  void rollback_quietly() {
    if (conn_ && PQtransactionStatus(conn_) != PQTRANS_IDLE && PQstatus(conn_) == CONNECTION_OK) {
      PQclear(PQexec(conn_, "ROLLBACK"));
    }
  }

  void migrate() {
    std::lock_guard lock(mutex_);
    const auto latest = static_cast<std::int64_t>(std::size(kMigrations));
    Transaction tx(*this);
    // Replicas starting together take turns here; the first migrates, the rest find it done.
    run("SELECT pg_advisory_xact_lock($1)", Params().add(kMigrationLock));
    run("CREATE TABLE IF NOT EXISTS tollgate_schema (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)");
    run("INSERT INTO tollgate_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING");
    std::int64_t version = run("SELECT version FROM tollgate_schema WHERE id = 1").int64_at(0, 0);
    if (version > latest) {
      throw std::runtime_error("postgresql: database schema version " + std::to_string(version) +
                               " is newer than this build (" + std::to_string(latest) + ")");
    }
    for (; version < latest; ++version) {
      run_script(kMigrations[version]);
      run("UPDATE tollgate_schema SET version = $1 WHERE id = 1", Params().add(version + 1));
    }
    tx.commit();
  }

  std::optional<User> find_user_locked(std::string_view name) {
    Result r = run(std::string(kSelectUser) + " WHERE name = $1", Params().add(name));
    if (r.rows() == 0) return std::nullopt;
    return read_user(r, 0);
  }

  // Every caller validates names first; this is the last line of defence.
  User ensure_user_locked(std::string_view name) {
    if (auto problem = user_name_problem(name)) throw StoreError(*problem);
    run("INSERT INTO users (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        Params().add(name).add(now_ms()));
    auto user = find_user_locked(name);
    if (!user) throw std::runtime_error("postgresql: user vanished after insert");
    return *user;
  }

  ApiKey key_by_id_locked(std::int64_t id) {
    Result r = run(std::string(kSelectKey) + " WHERE k.id = $1", Params().add(id));
    if (r.rows() == 0) throw std::runtime_error("postgresql: key vanished");
    return read_key(r, 0);
  }

  // The id of the one unrevoked key whose prefix starts with `prefix`.
  std::int64_t resolve_prefix_locked(std::string_view prefix) {
    const std::string shown(prefix);
    if (prefix.empty()) throw StoreError("an empty prefix matches every key");
    Result r =
        run("SELECT id, CASE WHEN revoked_at IS NULL THEN 1 ELSE 0 END FROM api_keys"
            " WHERE left(prefix, length($1)) = $1 ORDER BY id",
            Params().add(prefix));
    std::int64_t active = 0;
    std::int64_t id = 0;
    for (int i = 0; i < r.rows(); ++i) {
      if (r.int64_at(i, 1)) {
        ++active;
        id = r.int64_at(i, 0);
      }
    }
    if (r.rows() == 0) throw StoreError("no key with prefix " + shown);
    if (active == 0) throw StoreError("key " + shown + " is already revoked");
    if (active > 1) throw StoreError("prefix " + shown + " is ambiguous: " + std::to_string(active) + " keys");
    return id;
  }

  void insert_job_locked(const JobRecord& job) {
    run("INSERT INTO jobs (id, endpoint, user_id, key_id, state, request, webhook, output, error, created_at,"
        " started_at, finished_at, expires_at, execution_timeout_ms, ttl_ms, attempts)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        Params()
            .add(job.id)
            .add(job.endpoint)
            .add(job.user_id)
            .add(job.key_id)
            .add(job_state_name(job.state))
            .add(job.request)
            .add(job.webhook)
            .add(job.output)
            .add(job.error)
            .add(job.created_at)
            .add(job.started_at)
            .add(job.finished_at)
            .add(job.expires_at)
            .add(job.execution_timeout_ms)
            .add(job.ttl_ms)
            .add(job.attempts));
  }

  void update_job_locked(const JobRecord& job) {
    run("UPDATE jobs SET state = $2, webhook = $3, output = $4, error = $5, started_at = $6, finished_at = $7,"
        " expires_at = $8, execution_timeout_ms = $9, ttl_ms = $10, attempts = $11 WHERE id = $1",
        Params()
            .add(job.id)
            .add(job_state_name(job.state))
            .add(job.webhook)
            .add(job.output)
            .add(job.error)
            .add(job.started_at)
            .add(job.finished_at)
            .add(job.expires_at)
            .add(job.execution_timeout_ms)
            .add(job.ttl_ms)
            .add(job.attempts));
  }

  // One field of a COPY text row: backslash, tab, newline and CR escaped.
  static void append_copy_text(std::string& out, std::string_view text) {
    for (char c : pg::pg_text(text)) {
      switch (c) {
        case '\\':
          out += "\\\\";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        default:
          out += c;
      }
    }
  }
  static void append_copy_number(std::string& out, std::optional<std::int64_t> value) {
    if (value) {
      out += std::to_string(*value);
    } else {
      out += "\\N";
    }
  }

  // COPY: the cheapest way into a table for the server (no statement to parse
  // and plan per batch); PgBouncer's transaction mode passes it through.
  static constexpr const char* kUsageColumns =
      "ts, user_id, key_id, route, model, backend, status, prompt_tokens, completion_tokens, latency_us, ttft_us,"
      " counted, estimated, request_id";

  void insert_usage_rows(std::span<const UsageEvent> rows, const char* table) {
    ensure_connected();
    {
      const std::string copy = std::string("COPY ") + table + " (" + kUsageColumns + ") FROM STDIN";
      Result start(PQexec(conn_, copy.c_str()));
      if (PQresultStatus(start.get()) != PGRES_COPY_IN) check(start);
    }
    std::string data;
    data.reserve(rows.size() * 96);
    for (const UsageEvent& e : rows) {
      // Each text is cut to its bound whatever the caller did.
      append_copy_number(data, e.ts);
      data += '\t';
      append_copy_number(data, e.user_id);
      data += '\t';
      append_copy_number(data, e.key_id);
      data += '\t';
      append_copy_text(data, truncate_utf8(e.route, kMaxStoredRoute));
      data += '\t';
      append_copy_text(data, truncate_utf8(e.model, kMaxStoredName));
      data += '\t';
      append_copy_text(data, truncate_utf8(e.backend, kMaxStoredName));
      data += '\t';
      append_copy_number(data, e.status);
      data += '\t';
      append_copy_number(data, e.prompt_tokens);
      data += '\t';
      append_copy_number(data, e.completion_tokens);
      data += '\t';
      append_copy_number(data, e.latency_us);
      data += '\t';
      append_copy_number(data, e.ttft_us);
      data += '\t';
      append_copy_number(data, e.counted ? 1 : 0);
      data += '\t';
      append_copy_number(data, e.estimated ? 1 : 0);
      data += '\t';
      if (e.request_id.empty()) {
        data += "\\N";
      } else {
        append_copy_text(data, truncate_utf8(e.request_id, kMaxStoredName));
      }
      data += '\n';
    }
    const bool sent = PQputCopyData(conn_, data.data(), static_cast<int>(data.size())) == 1;
    const bool ended = PQputCopyEnd(conn_, sent ? nullptr : "tollgate: sending the rows failed") == 1;
    // The COPY's own result, then nothing: read to the end before the next statement.
    Result done(PQgetResult(conn_));
    while (PGresult* extra = PQgetResult(conn_)) PQclear(extra);
    if (!sent || !ended) throw std::runtime_error("postgresql: COPY failed: " + std::string(PQerrorMessage(conn_)));
    check(done);
  }

  void read_windows(const std::string& sql, const Params& params, std::map<std::int64_t, SubjectUsage>& out,
                    WindowCounts SubjectUsage::*window) {
    Result r = run(sql, params);
    for (int i = 0; i < r.rows(); ++i) {
      WindowCounts& counts = out[r.int64_at(i, 0)].*window;
      counts.requests = r.int64_at(i, 1);
      counts.tokens = r.int64_at(i, 2);
    }
  }

  std::string url_;
  std::mutex mutex_;
  PGconn* conn_ = nullptr;
  bool in_transaction_ = false;  // between a Transaction's BEGIN and its end
  bool listening_ = false;       // LISTEN tollgate_access was sent on this session
};

}  // namespace

std::unique_ptr<Store> open_postgres_store(const std::string& url) { return std::make_unique<PostgresStore>(url); }

}  // namespace tollgate::metering
