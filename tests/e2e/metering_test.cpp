// Metering durability through the real binary: every answered request leaves
// exactly one usage row across a graceful stop, a SIGKILL loses at most the
// flush window and never corrupts the database, and the daily rollup agrees
// with the event log.
#include <signal.h>
#include <sqlite3.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>

#include "harness.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kConfig = R"(metering: {flush_interval: FLUSH}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
)";

std::string config_with_flush(const std::string& flush) {
  std::string c = kConfig;
  c.replace(c.find("FLUSH"), 5, flush);
  return c;
}

// The usage object of a streamed body: the chunk that carries one.
json::object streamed_usage(const std::string& body) {
  std::size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    auto end = body.find("\n\n", pos);
    auto data = body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") continue;
    auto event = json::parse(data).as_object();
    if (auto* usage = event.if_contains("usage"); usage && usage->is_object()) return usage->as_object();
  }
  throw std::runtime_error("no usage chunk in the stream: " + body);
}

// What the clients saw, to compare with the rows.
struct Seen {
  std::int64_t total = 0;
  std::map<std::tuple<std::string, int>, std::int64_t> by_route_status;
  std::int64_t prompt_tokens = 0;      // in 200 answers
  std::int64_t completion_tokens = 0;  // in 200 answers
};

// Catch2 assertions are not thread-safe: workers throw and the main thread reports.
void expect_status(const HttpResponse& r, int status, bool may_be_limited) {
  if (r.status == status || (may_be_limited && r.status == 429)) return;
  throw std::runtime_error("expected " + std::to_string(status) + ", got " + std::to_string(r.status) + ": " + r.body);
}

// Sends request number `i` of a fixed mix and records the outcome. With
// `may_be_limited`, a request that needs admission may get a 429 instead.
void send_mixed(HttpClient& client, const std::string& key, int i, bool may_be_limited, Seen& seen) {
  std::string route;
  HttpResponse r;
  json::object usage;
  std::string words;
  for (int w = 0; w <= i % 5; ++w) words += (w ? " w" : "w") + std::to_string(w);
  switch (i % 10) {
    case 0:
      route = "/v1/models";
      r = client.get(route, key);
      expect_status(r, 200, may_be_limited);
      break;
    case 1:
      route = "/v1/chat/completions";
      r = client.post(route, key, chat_body("no-such-model", "hi"));
      expect_status(r, 404, may_be_limited);  // admitted before it is judged
      break;
    case 2:
      route = "/v1/chat/completions";
      r = client.post(route, key, "{not json");
      expect_status(r, 400, may_be_limited);
      break;
    case 3:
      route = "/v1/chat/completions";
      r = client.post(route, key, chat_body("echo", words, R"("stream":true,"stream_options":{"include_usage":true})"));
      expect_status(r, 200, may_be_limited);
      if (r.status == 200) usage = streamed_usage(r.body);
      break;
    case 4:
      route = "/v1/completions";
      r = client.post(route, key, R"({"model":"echo","prompt":")" + words + R"(","max_tokens":2})");
      expect_status(r, 200, may_be_limited);
      if (r.status == 200) usage = r.json().at("usage").as_object();
      break;
    default:
      route = "/v1/chat/completions";
      r = client.post(route, key, chat_body("echo", words));
      expect_status(r, 200, may_be_limited);
      if (r.status == 200) usage = r.json().at("usage").as_object();
      break;
  }
  ++seen.total;
  ++seen.by_route_status[{route, r.status}];
  if (r.status == 200 && !usage.empty()) {
    seen.prompt_tokens += usage.at("prompt_tokens").as_int64();
    seen.completion_tokens += usage.at("completion_tokens").as_int64();
  }
}

// Runs `per_thread` mixed requests on each of `threads` connections at once.
Seen send_concurrently(std::uint16_t port, const std::vector<std::string>& keys, int threads, int per_thread,
                       bool may_be_limited = false) {
  std::vector<Seen> seen(static_cast<std::size_t>(threads));
  std::vector<std::string> errors(static_cast<std::size_t>(threads));
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      try {
        HttpClient client(port);
        const auto& key = keys[static_cast<std::size_t>(t) % keys.size()];
        for (int i = 0; i < per_thread; ++i) send_mixed(client, key, t * per_thread + i, may_be_limited, seen[static_cast<std::size_t>(t)]);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(t)] = e.what();
      }
    });
  }
  for (auto& w : workers) w.join();
  for (const auto& e : errors) {
    INFO(e);
    REQUIRE(e.empty());
  }
  Seen all;
  for (const auto& s : seen) {
    all.total += s.total;
    for (const auto& [k, v] : s.by_route_status) all.by_route_status[k] += v;
    all.prompt_tokens += s.prompt_tokens;
    all.completion_tokens += s.completion_tokens;
  }
  return all;
}

}  // namespace

TEST_CASE("SIGTERM loses no usage row: one row per answered request, as the clients saw it", "[e2e][metering]") {
  TempDir dir;
  auto db = dir.file("usage.db");
  // Keys made before the start are loaded at start: no probe request adds a row.
  auto alice = create_key(db, "alice");
  auto bob = create_key(db, "bob");
  GatewayProcess gw(dir, {config_with_flush("1s"), db, {}});

  constexpr int kThreads = 4, kPerThread = 75;
  auto seen = send_concurrently(gw.port(), {alice, bob}, kThreads, kPerThread);
  REQUIRE(seen.total == kThreads * kPerThread);

  REQUIRE(gw.stop(SIGTERM) == 0);
  CHECK(gw.log().find("stopped; " + std::to_string(seen.total) + " usage events written") != std::string::npos);

  CHECK(count_usage_rows(db) == seen.total);
  for (const auto& [route_status, n] : seen.by_route_status) {
    const auto& [route, status] = route_status;
    INFO(route << " " << status);
    CHECK(count_usage_rows(db, "route = '" + route + "' AND status = " + std::to_string(status)) == n);
  }
  // Every row names its caller and route; completions that reached the
  // backend name the model and the backend.
  CHECK(count_usage_rows(db, "user_id IS NULL OR key_id IS NULL OR route = ''") == 0);
  CHECK(count_usage_rows(db, "route = '/v1/models' AND (model != '' OR backend != '')") == 0);
  CHECK(count_usage_rows(db, "route LIKE '/v1/%completions' AND status = 200 AND (model != 'echo' OR backend != 'echo')") ==
        0);
  CHECK(count_usage_rows(db, "status = 404 AND model != 'no-such-model'") == 0);
  CHECK(count_usage_rows(db, "ttft_us IS NOT NULL") == seen.total / 10);  // the streamed ones
  CHECK(sql_int(db, "SELECT COUNT(DISTINCT user_id) FROM usage_events") == 2);
  CHECK(sql_int(db, "SELECT SUM(prompt_tokens) FROM usage_events WHERE status = 200") == seen.prompt_tokens);
  CHECK(sql_int(db, "SELECT SUM(completion_tokens) FROM usage_events WHERE status = 200") == seen.completion_tokens);
  CHECK(seen.prompt_tokens > 0);
  // Refused requests are metered and cost no tokens; those judged after admission (bad
  // body, unknown model) count as requests, the rest (401, 429) do not.
  CHECK(count_usage_rows(db, "status >= 400 AND (prompt_tokens != 0 OR completion_tokens != 0)") == 0);
  CHECK(count_usage_rows(db, "status IN (401, 429) AND counted != 0") == 0);
  CHECK(count_usage_rows(db, "status = 404") > 0);
  CHECK(count_usage_rows(db, "status = 404 AND counted = 1") == count_usage_rows(db, "status = 404"));
  CHECK(count_usage_rows(db, "status = 200 AND counted = 1") == count_usage_rows(db, "status = 200"));
}

TEST_CASE("SIGKILL loses at most the flush window and leaves a sound database", "[e2e][metering]") {
  TempDir dir;
  auto db = dir.file("usage.db");
  auto key = create_key(db, "alice");
  auto config = config_with_flush("200ms");
  constexpr int kFirst = 40, kSecond = 30;
  {
    GatewayProcess gw(dir, {config, db, {}});
    HttpClient client(gw.port());
    for (int i = 0; i < kFirst; ++i) REQUIRE(client.post("/v1/chat/completions", key, chat_body("echo", "a b")).status == 200);

    // Rows land within the flush window with no shutdown to push them.
    auto deadline = Clock::now() + 5s;
    while (count_usage_rows(db) < kFirst && Clock::now() < deadline) std::this_thread::sleep_for(20ms);
    REQUIRE(count_usage_rows(db) == kFirst);

    for (int i = 0; i < kSecond; ++i) REQUIRE(client.post("/v1/chat/completions", key, chat_body("echo", "c d")).status == 200);
    REQUIRE(gw.stop(SIGKILL) == 128 + SIGKILL);
  }

  auto check = sql_rows(db, "PRAGMA integrity_check");
  REQUIRE(check.size() == 1);
  CHECK(check[0][0] == "ok");
  auto rows = count_usage_rows(db);
  CHECK(rows >= kFirst);
  CHECK(rows <= kFirst + kSecond);
  // Rows and rollup were committed together: a batch is all or nothing.
  CHECK(sql_int(db, "SELECT SUM(requests) FROM usage_daily") == rows);

  GatewayProcess again(dir, {config, db, {}});
  HttpClient client(again.port());
  auto r = client.post("/v1/chat/completions", key, chat_body("echo", "still here"));
  REQUIRE(r.status == 200);
  CHECK(r.json().at("choices").at(0).at("message").at("content") == "still here");
  REQUIRE(again.stop(SIGTERM) == 0);
  CHECK(count_usage_rows(db) == rows + 1);
}

TEST_CASE("usage_daily agrees with the sums of usage_events after a stop", "[e2e][metering]") {
  TempDir dir;
  auto db = dir.file("usage.db");
  auto alice = create_key(db, "alice");
  auto alice2 = create_key(db, "alice");
  auto bob = create_key(db, "bob", {"--rpm", "1000", "--rpd", "15"});  // some of bob's get 429
  GatewayProcess gw(dir, {config_with_flush("100ms"), db, {}});

  auto seen = send_concurrently(gw.port(), {alice, alice2, bob}, 3, 40, true);
  REQUIRE(gw.stop(SIGTERM) == 0);
  REQUIRE(count_usage_rows(db) == seen.total);
  CHECK(count_usage_rows(db, "status = 429") > 0);

  const std::string day = "date(ts / 1000, 'unixepoch')";
  auto from_events = sql_rows(db,
                              "SELECT " + day + ", user_id, key_id, model, COUNT(*), SUM(counted), SUM(status >= 400),"
                              " SUM(prompt_tokens), SUM(completion_tokens),"
                              " SUM(CASE WHEN counted = 1 THEN prompt_tokens + completion_tokens ELSE 0 END)"
                              " FROM usage_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4");
  auto from_daily = sql_rows(db,
                             "SELECT day, user_id, key_id, model, requests, counted_requests, errors, prompt_tokens,"
                             " completion_tokens, counted_tokens FROM usage_daily ORDER BY 1, 2, 3, 4");
  REQUIRE(!from_events.empty());
  CHECK(from_daily == from_events);

  // And per user per day, which is what reports and quota restores read.
  auto per_user = [&](const std::string& table, const std::string& day_column, const std::string& requests) {
    return sql_rows(db, "SELECT " + day_column + ", user_id, " + requests + ", SUM(prompt_tokens), SUM(completion_tokens) FROM " +
                            table + " GROUP BY 1, 2 ORDER BY 1, 2");
  };
  auto users_events = per_user("usage_events", day, "COUNT(*)");
  auto users_daily = per_user("usage_daily", "day", "SUM(requests)");
  CHECK(users_events.size() == 2);
  CHECK(users_daily == users_events);
}

TEST_CASE("the schema carries a version after start", "[e2e][metering]") {
  TempDir dir;
  GatewayProcess gw(dir);
  CHECK(sql_int(gw.db(), "PRAGMA user_version") >= 1);
  for (const char* table : {"usage_events", "usage_daily", "users", "api_keys"}) {
    INFO(table);
    CHECK(sql_int(gw.db(), std::string("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '") + table +
                               "'") == 1);
  }
}

// Model names are the client's strings: the operator's report must show them
// escaped, never act on them (newlines forging rows, terminal escapes, NULs).
TEST_CASE("usage --by-model escapes client-chosen model names", "[e2e][metering]") {
  TempDir dir;
  auto db = dir.file("usage.db");
  auto mallory = create_key(db, "mallory");
  GatewayProcess gw(dir, {config_with_flush("100ms"), db, {}});
  wait_for_key(gw.port(), mallory);
  HttpClient client(gw.port());
  const std::string forged = R"(echo\n\u001b[31mred\u0000x\u009b)";
  auto r = client.post("/v1/chat/completions", mallory,
                       R"({"model":")" + forged + R"(","messages":[{"role":"user","content":"x"}]})");
  CHECK(r.status == 404);
  REQUIRE(gw.stop(SIGTERM) == 0);
  auto report = run_tollgate({"usage", "--by-model", "--db", db});
  REQUIRE(report.exit_code == 0);
  INFO(report.out);
  for (char c : report.out) {
    const auto byte = static_cast<unsigned char>(c);
    CHECK((c == '\n' || (byte >= 0x20 && byte != 0x7f)));
  }
  // The header, the key check's row (GET /v1/models names no model: "-") and the forged name's: three lines.
  CHECK(std::count(report.out.begin(), report.out.end(), '\n') == 3);
  CHECK(report.out.find("echo\\n\\x1b[31mred\\x00x\\xc2\\x9b") != std::string::npos);
  CHECK(report.out.find(" - ") != std::string::npos);
}
