// What only the PostgreSQL store does: its schema version and the advisory
// lock replicas migrate under, a connection the server dropped, and a
// password that stays out of messages. The contract every store keeps is
// tests/metering/store_contract_test.cpp, which this binary runs too.
#include <libpq-fe.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

#include "metering/store.hpp"
#include "tests/metering/store_contract.hpp"
#include "tests/metering/temp_postgres.hpp"

using namespace tollgate::metering;
using namespace tollgate::metering::test;

namespace {

// Runs `sql` on a connection of its own; the first column of the first row, if any.
std::string psql(const std::string& url, const std::string& sql) {
  PGconn* conn = PQconnectdb(url.c_str());
  REQUIRE(PQstatus(conn) == CONNECTION_OK);
  PGresult* r = PQexec(conn, sql.c_str());
  const auto status = PQresultStatus(r);
  INFO(PQresultErrorMessage(r));
  CHECK((status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK));
  std::string out = PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "";
  PQclear(r);
  PQfinish(conn);
  return out;
}

}  // namespace

TEST_CASE("postgresql:// and postgres:// URLs open PostgreSQL; anything else is a SQLite file", "[postgres]") {
  CHECK(is_postgres_url("postgresql://u@h/db"));
  CHECK(is_postgres_url("postgres://u@h/db"));
  CHECK_FALSE(is_postgres_url("./tollgate.db"));
  CHECK_FALSE(is_postgres_url("postgresql.db"));
  CHECK_FALSE(is_postgres_url("/var/lib/postgres://x"));
}

TEST_CASE("replicas opening a new database at once migrate it once", "[postgres]") {
  const std::string url = fresh_postgres_database();
  std::atomic<int> opened{0}, failed{0};
  std::vector<std::thread> replicas;
  for (int i = 0; i < 6; ++i) {
    replicas.emplace_back([&] {
      try {
        auto store = open_store(url);
        store->ensure_user("alice");
        ++opened;
      } catch (const std::exception&) {
        ++failed;
      }
    });
  }
  for (auto& t : replicas) t.join();
  CHECK(opened == 6);
  CHECK(failed == 0);
  CHECK(psql(url, "SELECT version FROM tollgate_schema") == "4");
  CHECK(psql(url, "SELECT COUNT(*) FROM users") == "1");
}

TEST_CASE("a database from a newer schema is refused", "[postgres]") {
  const std::string url = fresh_postgres_database();
  open_store(url);
  psql(url, "UPDATE tollgate_schema SET version = 99");
  CHECK_THROWS_WITH(open_store(url), Catch::Contains("newer"));
}

TEST_CASE("a connection the server dropped is reset on the next call", "[postgres]") {
  const std::string url = fresh_postgres_database();
  auto store = open_store(url);
  store->ensure_user("alice");
  psql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tollgate'");
  // The call that meets the dead connection may fail; the one after reconnects.
  try {
    store->find_user("alice");
  } catch (const std::exception&) {
  }
  auto alice = store->find_user("alice");
  REQUIRE(alice);
  CHECK(alice->name == "alice");
}

TEST_CASE("a store that cannot connect says where, without the password", "[postgres]") {
  for (const char* url : {"postgresql://tollgate:s3cret-pw@127.0.0.1:1/nowhere",
                          "postgresql://tollgate@127.0.0.1:1/nowhere?password=s3cret-pw&sslmode=disable",
                          "postgres://tollgate:s3cret-pw@127.0.0.1:1/nowhere?password=s3cret-pw"}) {
    INFO(url);
    try {
      open_store(url);
      FAIL("connected to port 1");
    } catch (const std::exception& e) {
      const std::string message = e.what();
      INFO(message);
      CHECK(message.find("127.0.0.1") != std::string::npos);
      CHECK(message.find("s3cret-pw") == std::string::npos);
    }
  }
}

// Only PostgreSQL promises it: a commit whose answer was lost may have
// happened, and the writer writes the batch again. (A SQLite commit is local:
// one that fails did not happen.)
TEST_CASE("usage rows carry a request id: a batch written again is stored once, rows and rollup", "[postgres]") {
  ContractDatabase db;  // a new PostgreSQL database
  auto store = db.open();
  const auto alice = store->ensure_user("alice");
  std::vector<UsageEvent> batch;
  for (int i = 0; i < 10; ++i) {
    batch.push_back(event(k2024_03_15_102030 + i, alice.id, 1, "m", 200, 3, 4));
    batch.back().request_id = "req-" + std::to_string(i);
  }
  store->append_usage(std::span<const UsageEvent>(batch.data(), 6));
  // The writer retries after a commit whose answer was lost: the first six
  // again, with four new ones, and an id the batch names twice.
  std::vector<UsageEvent> retried = batch;
  retried.push_back(retried.back());
  UsageEvent anonymous = event(k2024_03_15_102030, alice.id, 1, "m", 500, 1, 0);  // no id: always stored
  retried.push_back(anonymous);
  store->append_usage(retried);
  store->append_usage(std::span<const UsageEvent>(&anonymous, 1));

  CHECK(store->count_usage_events() == 12);
  const auto rows = store->usage(usage_query("alice", std::nullopt, false, false));
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].requests == 12);
  CHECK(rows[0].errors == 2);
  CHECK(rows[0].prompt_tokens == 10 * 3 + 2);
  CHECK(rows[0].completion_tokens == 10 * 4);
  // The quota windows count each request once too.
  const auto state = store->quota_state(k2024_03_15_102030 + 30);
  CHECK(state.users.at(alice.id).day.requests == 12);
}
