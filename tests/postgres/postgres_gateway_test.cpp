// The real binary on PostgreSQL: keys made with the CLI, quotas admitted and
// restored after a restart, usage in the database, a revoked key refused.
#include <catch2/catch.hpp>

#include <signal.h>

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
