// The metering store: users, keys, usage. SQLite is the embedded implementation;
// the interface lets a shared server database replace it for several replicas.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "metering/types.hpp"

namespace tollgate::metering {

// A store call that failed for a reason the caller can report (unknown user,
// ambiguous prefix, ...). Database corruption and I/O failures throw
// std::runtime_error instead.
struct StoreError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct NewKey {
  std::string user_name;  // the user is created when missing
  std::string prefix;
  std::string sha256_hex;
  std::optional<EpochMs> expires_at;
  std::vector<std::string> models;
  Limits limits;
};

// A serverless-style job (gateway/jobs.hpp), as the store keeps it.
enum class JobState { in_queue, in_progress, completed, failed, cancelled, timed_out };

// "IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT".
std::string_view job_state_name(JobState state);
std::optional<JobState> parse_job_state(std::string_view name);
inline bool job_state_final(JobState s) { return s != JobState::in_queue && s != JobState::in_progress; }

struct JobRecord {
  std::string id;
  std::string endpoint;
  std::int64_t user_id = 0;
  std::int64_t key_id = 0;
  JobState state = JobState::in_queue;
  std::string request;  // the job's body as submitted: {"input", "webhook", "policy"}
  std::string webhook;  // where the end is announced; empty: nowhere
  std::string output;   // a completed job's output, JSON
  std::string error;    // why it did not complete
  EpochMs created_at = 0;
  EpochMs started_at = 0;   // 0: not started
  EpochMs finished_at = 0;  // 0: not finished
  EpochMs expires_at = 0;   // a finished job is purged after this
  std::int64_t execution_timeout_ms = 0;
  std::int64_t ttl_ms = 0;    // kept this long after it finishes
  std::int64_t attempts = 0;  // runs started (retries and requeues count)
};

// One change to the jobs table: a new job, or a known job's new state.
struct JobWrite {
  bool insert = false;  // insert_job's rules; otherwise update_job's
  JobRecord record;
};

// Shared quota budgets (docs/quotas.md): per limit, per window, how much of
// it every replica on one database has taken between them. A replica claims a
// lease when its own runs out and gives back what it did not use.
struct BudgetClaim {
  std::string subject;      // "user:12", "key:7"
  std::string limit_name;   // "requests_per_minute", ... (the quota's metric labels)
  std::int64_t window = 0;  // the window's index: minute_index, day_index or month_index
  EpochMs window_end = 0;   // when the window ends; its row is purged a while after
  std::int64_t limit = 0;
  std::int64_t need = 0;  // granted whole or not at all
  // What the usage rows say this window used before any replica claimed from
  // it (an upgrade, a migration mid-window): a new budget starts there.
  std::int64_t used_before = 0;
};

// How much a claim takes beyond its need: while the budget left after the need
// holds at least kLeaseMinimumNeeds * kLeaseDivisor needs, a kLeaseDivisor-th
// of it; otherwise nothing, so the last of a budget goes one need at a time and
// is never stranded in an idle replica's lease.
inline constexpr std::int64_t kLeaseDivisor = 16;
inline constexpr std::int64_t kLeaseMinimumNeeds = 4;

struct BudgetOutcome {
  // Per claim, in order: what it was granted (need plus lease), and what is
  // left of that budget after it. All zero when `refused`.
  std::vector<std::int64_t> granted;
  std::vector<std::int64_t> remaining;
  // The first claim whose need did not fit; then nothing was granted.
  std::optional<std::size_t> refused;
};

// A change to one budget: negative gives back lease not used, positive charges
// use beyond what was leased (tokens a reply used past its reservation).
struct BudgetAdjustment {
  std::string subject;
  std::string limit_name;
  std::int64_t window = 0;
  EpochMs window_end = 0;
  std::int64_t delta = 0;
};

class Store {
 public:
  virtual ~Store() = default;

  // Users.
  virtual User ensure_user(std::string_view name) = 0;
  virtual std::optional<User> find_user(std::string_view name) = 0;
  virtual std::vector<User> list_users() = 0;
  virtual void set_user_limits(std::string_view name, const Limits& limits) = 0;  // StoreError if unknown

  // Keys.
  virtual ApiKey insert_key(const NewKey& key) = 0;
  virtual std::vector<ApiKey> list_keys(std::optional<std::string_view> user = std::nullopt) = 0;
  virtual std::optional<ApiKey> find_key_by_hash(std::string_view sha256_hex) = 0;
  // Revokes the one key whose prefix starts with `prefix`; StoreError when none
  // or several match. Returns the revoked key.
  virtual ApiKey revoke_key(std::string_view prefix, EpochMs now) = 0;
  virtual void set_key_limits(std::string_view prefix, const Limits& limits) = 0;
  // A number that changes whenever users or keys change, from any process.
  virtual std::int64_t keys_version() = 0;
  // Whether the store announces those changes as they commit (PostgreSQL's
  // LISTEN/NOTIFY); if not, readers poll keys_version.
  virtual bool announces_access_changes() const { return false; }
  // Waits up to `timeout` for such an announcement; whether one came. Throws
  // when the database cannot be reached.
  virtual bool wait_for_access_change(std::chrono::milliseconds timeout) {
    (void)timeout;
    return false;
  }

  // Settings (e.g. the admin key's hash).
  virtual std::optional<std::string> get_setting(std::string_view name) = 0;
  virtual void put_setting(std::string_view name, std::string_view value) = 0;

  // Usage: one transaction for the whole batch (events and rollups).
  virtual void append_usage(std::span<const UsageEvent> events) = 0;
  virtual std::vector<UsageRow> usage(const UsageQuery& query) = 0;
  virtual std::int64_t count_usage_events() = 0;

  // Current-window counts per user id and per key id, of events with counted=1.
  struct QuotaState {
    std::map<std::int64_t, SubjectUsage> users;
    std::map<std::int64_t, SubjectUsage> keys;
  };
  virtual QuotaState quota_state(EpochMs now) = 0;

  // Shared quota budgets. All claims in one transaction, all or nothing.
  virtual BudgetOutcome claim_budgets(std::span<const BudgetClaim> claims) = 0;
  // In one transaction; a budget never goes below zero.
  virtual void adjust_budgets(std::span<const BudgetAdjustment> adjustments) = 0;
  // Deletes the budgets of windows that ended before `before`; returns how many.
  virtual std::int64_t purge_budgets(EpochMs before) = 0;

  // Jobs. Each call is its own transaction: a job inserted is on disk when it returns.
  virtual void insert_job(const JobRecord& job) = 0;  // StoreError when the id exists
  virtual void update_job(const JobRecord& job) = 0;  // everything but id, endpoint, user, key, request, created_at
  // Several changes in one transaction, in order (gateway/job_writer.hpp's
  // group commit). A change the store refuses (StoreError: an id that exists)
  // is skipped alone; the result says, per change, whether it was applied.
  // Any other failure throws and writes nothing.
  virtual std::vector<bool> write_jobs(std::span<const JobWrite> writes) = 0;
  virtual std::optional<JobRecord> find_job(std::string_view id) = 0;
  // IN_QUEUE and IN_PROGRESS jobs, oldest first (what a restart picks up).
  virtual std::vector<JobRecord> unfinished_jobs() = 0;
  // Deletes finished jobs whose expires_at has passed; returns how many.
  virtual std::int64_t purge_jobs(EpochMs now) = 0;
};

// Opens (creating and migrating as needed) a SQLite store at `path` in WAL mode.
// Each call opens its own connection; a connection is used from one thread at a
// time (the object serialises its own calls).
std::unique_ptr<Store> open_sqlite_store(const std::string& path);

// Opens (creating the schema and migrating it as needed, once across replicas
// that start together) a PostgreSQL store at `url`, a libpq connection URI:
// postgresql://user:password@host:5432/db. One connection per object, which
// serialises its own calls; a broken connection is reset on the next call.
std::unique_ptr<Store> open_postgres_store(const std::string& url);

// Whether `database` names PostgreSQL (postgresql:// or postgres://) rather
// than a SQLite file.
bool is_postgres_url(std::string_view database);

// The store `database` names: PostgreSQL for such a URL, else a SQLite file.
std::unique_ptr<Store> open_store(const std::string& database);

// Copies a SQLite installation (users, keys, settings, usage, jobs; ids kept)
// into an empty PostgreSQL database in one transaction; rows copied per table.
// StoreError when the target already holds data.
std::vector<std::pair<std::string, std::int64_t>> copy_sqlite_to_postgres(const std::string& sqlite_path,
                                                                          const std::string& url);

}  // namespace tollgate::metering
