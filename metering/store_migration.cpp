// `tollgate migrate --from FILE.db --to postgresql://…`: an installation's
// SQLite file copied into an empty PostgreSQL database, ids and all, in one
// transaction, so keys keep working and usage and jobs carry over.
#include <sqlite3.h>

#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "metering/postgres_wire.hpp"
#include "metering/store.hpp"

namespace tollgate::metering {
namespace {

struct Table {
  const char* name;
  const char* columns;      // the same in both schemas
  const char* on_conflict;  // appended to each INSERT; empty: none
  const char* serial;       // the column whose sequence follows the copied ids; empty: none
};

// Parents before children (api_keys refers to users).
constexpr Table kTables[] = {
    {"users", "id, name, created_at, rpm, tpm, rpd, tpd, tokens_per_month", "", "id"},
    {"api_keys",
     "id, user_id, prefix, sha256, created_at, expires_at, revoked_at, models, rpm, tpm, rpd, tpd, tokens_per_month",
     "", "id"},
    {"settings", "name, value", "", ""},
    {"usage_events",
     "id, ts, user_id, key_id, route, model, backend, status, prompt_tokens, completion_tokens, latency_us, ttft_us,"
     " counted, estimated, request_id",
     "", "id"},
    // Two SQLite model names that differ only in bytes PostgreSQL cannot hold
    // become one row: their counts add up.
    {"usage_daily",
     "day, user_id, key_id, model, requests, counted_requests, errors, prompt_tokens, completion_tokens, "
     "counted_tokens",
     " ON CONFLICT (day, user_id, key_id, model) DO UPDATE SET"
     " requests = usage_daily.requests + excluded.requests,"
     " counted_requests = usage_daily.counted_requests + excluded.counted_requests,"
     " errors = usage_daily.errors + excluded.errors,"
     " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
     " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
     " counted_tokens = usage_daily.counted_tokens + excluded.counted_tokens",
     ""},
    {"jobs",
     "id, endpoint, user_id, key_id, state, request, webhook, output, error, created_at, started_at, finished_at,"
     " expires_at, execution_timeout_ms, ttl_ms, attempts",
     "", ""},
};

constexpr std::size_t kRowsPerInsert = 500;

int column_count(const char* columns) {
  int n = 1;
  for (const char* c = columns; *c; ++c) n += *c == ',';
  return n;
}

// libpq's connection and a statement on it, checked.
class Target {
 public:
  explicit Target(const std::string& url) : conn_(PQconnectdb(url.c_str())), url_(url) {
    if (!conn_ || PQstatus(conn_) != CONNECTION_OK) {
      const std::string message = conn_ ? PQerrorMessage(conn_) : "out of memory";
      PQfinish(conn_);
      throw std::runtime_error("postgresql: cannot connect to " + pg::redacted(url) + ": " + message);
    }
    PQsetNoticeProcessor(
        conn_, [](void*, const char*) {}, nullptr);
  }
  ~Target() { PQfinish(conn_); }
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  pg::Result run(const std::string& sql, const pg::Params& params = pg::Params()) {
    const auto values = params.pointers();
    pg::Result r(PQexecParams(conn_, sql.c_str(), params.size(), nullptr, values.data(), nullptr, nullptr, 0));
    const auto status = PQresultStatus(r.get());
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      throw std::runtime_error("postgresql: " + std::string(PQresultErrorMessage(r.get())));
    }
    return r;
  }

 private:
  PGconn* conn_;
  std::string url_;
};

// The source, read only.
class Source {
 public:
  explicit Source(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
      const std::string message = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      throw std::runtime_error("sqlite: cannot open " + path + ": " + message);
    }
  }
  ~Source() { sqlite3_close(db_); }
  Source(const Source&) = delete;
  Source& operator=(const Source&) = delete;

  sqlite3_stmt* prepare(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
      throw std::runtime_error("sqlite: " + std::string(sqlite3_errmsg(db_)));
    }
    return stmt;
  }
  [[noreturn]] void fail() { throw std::runtime_error("sqlite: " + std::string(sqlite3_errmsg(db_))); }

 private:
  sqlite3* db_ = nullptr;
};

// Copies one table; returns its row count.
std::int64_t copy_table(Source& source, Target& target, const Table& table) {
  const int columns = column_count(table.columns);
  std::unique_ptr<sqlite3_stmt, decltype(&sqlite3_finalize)> select(
      source.prepare(std::string("SELECT ") + table.columns + " FROM " + table.name + " ORDER BY 1"),
      &sqlite3_finalize);
  std::int64_t copied = 0;
  bool more = true;
  while (more) {
    std::string sql = std::string("INSERT INTO ") + table.name + " (" + table.columns + ") VALUES ";
    pg::Params params;
    std::size_t rows = 0;
    while (rows < kRowsPerInsert) {
      const int rc = sqlite3_step(select.get());
      if (rc == SQLITE_DONE) {
        more = false;
        break;
      }
      if (rc != SQLITE_ROW) source.fail();
      sql += rows == 0 ? "(" : ", (";
      for (int c = 0; c < columns; ++c) {
        sql += (c ? ", $" : "$") + std::to_string(params.size() + 1);
        if (sqlite3_column_type(select.get(), c) == SQLITE_NULL) {
          params.add(std::optional<std::string>());
        } else {
          const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(select.get(), c));
          params.add(std::string_view(text, static_cast<std::size_t>(sqlite3_column_bytes(select.get(), c))));
        }
      }
      sql += ')';
      ++rows;
    }
    if (rows == 0) break;
    target.run(sql + table.on_conflict, params);
    copied += static_cast<std::int64_t>(rows);
  }
  if (*table.serial) {
    // New rows continue after the copied ids.
    target.run(std::string("SELECT setval(pg_get_serial_sequence('") + table.name + "', '" + table.serial +
               "'), COALESCE((SELECT MAX(" + table.serial + ") FROM " + table.name + "), 0) + 1, false)");
  }
  return copied;
}

}  // namespace

std::vector<std::pair<std::string, std::int64_t>> copy_sqlite_to_postgres(const std::string& sqlite_path,
                                                                          const std::string& url) {
  if (!std::filesystem::is_regular_file(sqlite_path)) {
    throw StoreError("no SQLite database at " + sqlite_path);
  }
  if (!is_postgres_url(url)) throw StoreError("the target must be a postgresql:// URL");
  // Both schemas at their latest version first, so the columns agree.
  open_sqlite_store(sqlite_path);
  open_postgres_store(url);

  Source source(sqlite_path);
  Target target(url);
  target.run("BEGIN");
  // Nothing to merge into: a copy is only exact into an empty database.
  for (const Table& table : kTables) {
    const auto n = target.run(std::string("SELECT COUNT(*) FROM ") + table.name).int64_at(0, 0);
    if (n != 0) {
      throw StoreError("the target database is not empty: " + std::string(table.name) + " holds " + std::to_string(n) +
                       " rows");
    }
  }
  std::vector<std::pair<std::string, std::int64_t>> copied;
  for (const Table& table : kTables) copied.emplace_back(table.name, copy_table(source, target, table));
  target.run("COMMIT");
  return copied;
}

}  // namespace tollgate::metering
