// Quotas through the real binary: atomic admission under concurrency, the
// x-ratelimit-* headers on every authenticated answer, per-user limits across
// keys, token reservations that settle to the real count, every window kind,
// and counters that survive a restart.
#include <catch2/catch.hpp>

#include <signal.h>

#include <latch>
#include <regex>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

constexpr const char* kConfig = R"(metering: {flush_interval: 100ms}
backends:
  - {name: echo, type: echo}
models:
  - name: echo
    deployments: [{backend: echo}]
  - name: echo2
    deployments: [{backend: echo}]
)";

std::int64_t epoch_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Quota windows are fixed UTC windows: a test that counts within one waits
// (bounded by `margin`) when the current window is about to roll over, and
// returns the window's index so the caller can assert it did not roll.
std::int64_t fresh_window(std::int64_t window_ms, std::chrono::milliseconds margin) {
  auto now = epoch_ms();
  auto left = window_ms - now % window_ms;
  if (left < margin.count()) std::this_thread::sleep_for(std::chrono::milliseconds(left + 50));
  return epoch_ms() / window_ms;
}
constexpr std::int64_t kMinuteMs = 60'000;
constexpr std::int64_t kDayMs = 86'400'000;

void check_rate_limited(const HttpResponse& r, std::int64_t max_retry_after) {
  REQUIRE(r.status == 429);
  auto retry = r.header("retry-after");
  REQUIRE(std::regex_match(retry, std::regex("[0-9]+")));
  CHECK(std::stoll(retry) >= 1);
  CHECK(std::stoll(retry) <= max_retry_after);
  auto error = r.json().at("error").as_object();
  CHECK(error.at("type") == "rate_limit_error");
  CHECK(error.at("code") == "rate_limit_exceeded");
  CHECK(!error.at("message").as_string().empty());
}

bool is_reset(const std::string& text) {
  static const std::regex reset("([0-9]+h)?([0-9]+m)?[0-9]+s|[0-9]+ms");
  return std::regex_match(text, reset);
}

// Asserts the request trio (and, when `tokens_remaining` is set, the token trio).
void check_limit_headers(const HttpResponse& r, std::int64_t limit, std::int64_t remaining,
                         std::optional<std::int64_t> token_limit = {}, std::optional<std::int64_t> tokens_remaining = {}) {
  INFO("status " << r.status << ": " << r.body);
  CHECK(r.header("x-ratelimit-limit-requests") == std::to_string(limit));
  CHECK(r.header("x-ratelimit-remaining-requests") == std::to_string(remaining));
  CHECK(is_reset(r.header("x-ratelimit-reset-requests")));
  if (token_limit) {
    CHECK(r.header("x-ratelimit-limit-tokens") == std::to_string(*token_limit));
    CHECK(r.header("x-ratelimit-remaining-tokens") == std::to_string(*tokens_remaining));
    CHECK(is_reset(r.header("x-ratelimit-reset-tokens")));
  } else {
    CHECK(r.headers.count("x-ratelimit-limit-tokens") == 0);
    CHECK(r.headers.count("x-ratelimit-remaining-tokens") == 0);
    CHECK(r.headers.count("x-ratelimit-reset-tokens") == 0);
  }
}

void check_no_limit_headers(const HttpResponse& r) {
  for (const char* h : {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}) {
    INFO(h);
    CHECK(r.headers.count(h) == 0);
  }
}

// A three-word prompt: the echo backend counts 3 prompt and 3 completion tokens.
std::string three_words(int max_tokens) { return chat_body("echo", "one two three", "\"max_tokens\":" + std::to_string(max_tokens)); }

// How many sequential requests a token budget admits when each reserves
// `reserve` and then settles to `actual`.
int admitted_by_budget(std::int64_t budget, std::int64_t reserve, std::int64_t actual) {
  int n = 0;
  for (std::int64_t used = 0; used + reserve <= budget; used += actual) ++n;
  return n;
}

// Sends completions of three_words(max_tokens) until the first refusal; returns how many passed.
int send_until_refused(HttpClient& client, const std::string& key, int max_tokens, int bound) {
  for (int i = 0; i < bound; ++i) {
    auto r = client.post("/v1/chat/completions", key, three_words(max_tokens));
    if (r.status == 429) return i;
    REQUIRE(r.status == 200);
    REQUIRE(r.json().at("usage").at("total_tokens") == 6);
  }
  FAIL("no refusal within " << bound << " requests");
  return bound;
}

}  // namespace

TEST_CASE("concurrent requests against an rpm limit admit exactly the limit", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto key = create_key(db, "alice", {"--rpm", "20"});
  GatewayProcess gw(dir, {kConfig, db, {}});

  constexpr int kThreads = 12, kEach = 5;
  // Connect after any wait for a fresh window: an idle connection would meet the header timeout.
  auto minute = fresh_window(kMinuteMs, 15s);
  std::vector<std::unique_ptr<HttpClient>> clients;
  for (int t = 0; t < kThreads; ++t) clients.push_back(std::make_unique<HttpClient>(gw.port(), 20s));
  std::vector<std::vector<HttpResponse>> answers(kThreads);
  std::vector<std::string> errors(kThreads);
  std::latch start(kThreads);

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      try {
        for (int i = 0; i < kEach; ++i) {
          // Alternate routes: both admit through the same counters.
          answers[t].push_back(i % 2 ? clients[t]->get("/v1/models", key)
                                     : clients[t]->post("/v1/chat/completions", key, chat_body("echo", "hi")));
        }
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  }
  for (auto& th : threads) th.join();
  REQUIRE(epoch_ms() / kMinuteMs == minute);  // the window did not roll mid-burst

  int ok = 0, limited = 0;
  for (int t = 0; t < kThreads; ++t) {
    INFO(errors[t]);
    REQUIRE(errors[t].empty());
    for (const auto& r : answers[t]) {
      if (r.status == 200) {
        ++ok;
      } else {
        ++limited;
        check_rate_limited(r, 60);
        CHECK(r.header("x-ratelimit-remaining-requests") == "0");
      }
    }
  }
  CHECK(ok == 20);
  CHECK(limited == 40);
}

TEST_CASE("every authenticated answer carries the x-ratelimit headers of the limits that apply", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto limited = create_key(db, "alice", {"--rpd", "9", "--tpd", "1000", "--models", "echo"});
  auto requests_only = create_key(db, "bob", {"--rpd", "100"});
  auto unlimited = create_key(db, "carol");
  GatewayProcess gw(dir, {kConfig, db, {}});
  fresh_window(kDayMs, 10s);
  HttpClient client(gw.port());

  // Bad requests are admitted before they are judged: each costs a request, no tokens.
  check_limit_headers(client.get("/v1/models", limited), 9, 8, 1000, 1000);
  auto bad = client.post("/v1/chat/completions", limited, "{not json");
  REQUIRE(bad.status == 400);
  check_limit_headers(bad, 9, 7, 1000, 1000);
  auto unknown = client.post("/v1/chat/completions", limited, chat_body("no-such-model", "hi"));
  REQUIRE(unknown.status == 404);
  check_limit_headers(unknown, 9, 6, 1000, 1000);
  auto forbidden = client.post("/v1/chat/completions", limited, chat_body("echo2", "hi"));
  REQUIRE(forbidden.status == 403);
  check_limit_headers(forbidden, 9, 5, 1000, 1000);

  // Each completion reserves 3 + 10 and settles to 6.
  std::int64_t used = 0;
  for (int remaining = 4; remaining >= 0; --remaining) {
    bool stream = remaining == 2;
    auto r = client.post("/v1/chat/completions", limited,
                         chat_body("echo", "one two three", stream ? R"("max_tokens":10,"stream":true)" : R"("max_tokens":10)"));
    REQUIRE(r.status == 200);
    CHECK(r.header("content-type") == (stream ? "text/event-stream" : "application/json"));
    check_limit_headers(r, 9, remaining, 1000, 1000 - used - 13);
    used += 6;
  }
  auto refused = client.post("/v1/chat/completions", limited, three_words(10));
  check_rate_limited(refused, 86'400);
  check_limit_headers(refused, 9, 0, 1000, 1000 - used);
  auto refused_models = client.get("/v1/models", limited);
  check_rate_limited(refused_models, 86'400);
  check_limit_headers(refused_models, 9, 0, 1000, 1000 - used);

  // Only the kinds of limit that are set are described.
  auto r = client.post("/v1/chat/completions", requests_only, three_words(10));
  REQUIRE(r.status == 200);
  check_limit_headers(r, 100, 99);
  auto none = client.post("/v1/chat/completions", unlimited, three_words(10));
  REQUIRE(none.status == 200);
  check_no_limit_headers(none);
  // An unknown key is not a caller: no quota to describe.
  auto stranger = client.post("/v1/chat/completions", "tg-00000000000000000000000000000000", three_words(10));
  REQUIRE(stranger.status == 401);
  check_no_limit_headers(stranger);
}

TEST_CASE("a per-user limit applies across the user's keys", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  // Set with the CLI before the start...
  REQUIRE(run_tollgate({"users", "limits", "dave", "--rpd", "3", "--db", db}).exit_code == 0);
  auto d1 = create_key(db, "dave"), d2 = create_key(db, "dave");
  auto c1 = create_key(db, "carol"), c2 = create_key(db, "carol");
  GatewayProcess gw(dir, {kConfig, db, {}});
  REQUIRE(!gw.admin_key().empty());
  fresh_window(kDayMs, 10s);
  HttpClient client(gw.port());

  // ... and with the admin API on the running gateway.
  auto put = client.request("PUT", "/admin/users/carol/quota", R"({"requests_per_day":4})",
                            {{"Authorization", "Bearer " + gw.admin_key()}});
  REQUIRE(put.status == 200);

  for (auto [user, keys, limit] : {std::tuple{"dave", std::array{d1, d2}, 3}, std::tuple{"carol", std::array{c1, c2}, 4}}) {
    INFO(user);
    for (int i = 0; i < limit; ++i) {
      auto r = client.post("/v1/chat/completions", keys[i % 2], chat_body("echo", "hi"));
      REQUIRE(r.status == 200);
      check_limit_headers(r, limit, limit - 1 - i);
    }
    for (const auto& key : keys) {
      auto r = client.post("/v1/chat/completions", key, chat_body("echo", "hi"));
      check_rate_limited(r, 86'400);
      CHECK(std::string(r.json().at("error").at("message").as_string()).find("user") != std::string::npos);
    }
  }
}

TEST_CASE("token limits reserve prompt plus max_tokens and settle to the real count", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto tpm = create_key(db, "alice", {"--tpm", "50"});
  auto tpd = create_key(db, "bob", {"--tpd", "50"});
  GatewayProcess gw(dir, {kConfig, db, {}});

  // 3 + 20 reserved, 3 + 3 used: more pass than 50 / 23 would suggest.
  const int expected = admitted_by_budget(50, 23, 6);
  REQUIRE(expected == 5);

  SECTION("per minute") {
    // Connect after any wait for a fresh window: an idle connection would meet the header timeout.
    auto minute = fresh_window(kMinuteMs, 15s);
    HttpClient client(gw.port());
    // A request that could never fit is refused and reserves nothing.
    auto huge = client.post("/v1/chat/completions", tpm, three_words(60));
    check_rate_limited(huge, 60);
    CHECK(std::string(huge.json().at("error").at("message").as_string()).find("exceed") != std::string::npos);
    CHECK(huge.header("x-ratelimit-remaining-tokens") == "50");
    CHECK(send_until_refused(client, tpm, 20, 20) == expected);
    REQUIRE(epoch_ms() / kMinuteMs == minute);
  }
  SECTION("per day") {
    fresh_window(kDayMs, 10s);
    HttpClient client(gw.port());
    check_rate_limited(client.post("/v1/chat/completions", tpd, three_words(60)), 86'400);
    CHECK(send_until_refused(client, tpd, 20, 20) == expected);
    // With nothing reserved beyond the prompt, what is left still admits.
    auto r = client.post("/v1/chat/completions", tpd, three_words(1));
    CHECK(r.status == 200);
  }
}

TEST_CASE("requests-per-day, tokens-per-day and tokens-per-month limits enforce", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto rpd = create_key(db, "alice", {"--rpd", "3"});
  auto tpd = create_key(db, "bob", {"--tpd", "30"});
  auto tpmonth = create_key(db, "carol", {"--tokens-per-month", "30"});
  GatewayProcess gw(dir, {kConfig, db, {}});
  fresh_window(kDayMs, 10s);
  HttpClient client(gw.port());

  for (int i = 0; i < 3; ++i) REQUIRE(client.post("/v1/chat/completions", rpd, three_words(5)).status == 200);
  check_rate_limited(client.post("/v1/chat/completions", rpd, three_words(5)), 86'400);
  check_rate_limited(client.get("/v1/models", rpd), 86'400);

  // 3 + 5 reserved, settling to 6: 0+8, 6+8, 12+8, 18+8 fit in 30; 24+8 does not.
  const int expected = admitted_by_budget(30, 8, 6);
  REQUIRE(expected == 4);
  CHECK(send_until_refused(client, tpd, 5, 10) == expected);
  CHECK(send_until_refused(client, tpmonth, 5, 10) == expected);
  auto r = client.post("/v1/chat/completions", tpmonth, three_words(5));
  check_rate_limited(r, 31 * 86'400);
  CHECK(r.header("x-ratelimit-limit-tokens") == "30");
  CHECK(r.header("x-ratelimit-remaining-tokens") == "6");
}

TEST_CASE("quota counters survive a restart", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto requests = create_key(db, "alice", {"--rpd", "5"});
  auto tokens = create_key(db, "bob", {"--tpd", "20"});
  fresh_window(kDayMs, 30s);
  {
    GatewayProcess gw(dir, {kConfig, db, {}});
    HttpClient client(gw.port());
    for (int i = 0; i < 3; ++i) REQUIRE(client.post("/v1/chat/completions", requests, three_words(5)).status == 200);
    // 0+8 and 6+8 fit in 20; 12 are used.
    for (int i = 0; i < 2; ++i) REQUIRE(client.post("/v1/chat/completions", tokens, three_words(5)).status == 200);
    REQUIRE(gw.stop(SIGTERM) == 0);
  }
  GatewayProcess gw(dir, {kConfig, db, {}});
  HttpClient client(gw.port());
  for (int remaining = 1; remaining >= 0; --remaining) {
    auto r = client.post("/v1/chat/completions", requests, three_words(5));
    REQUIRE(r.status == 200);
    CHECK(r.header("x-ratelimit-remaining-requests") == std::to_string(remaining));
  }
  check_rate_limited(client.post("/v1/chat/completions", requests, three_words(5)), 86'400);
  // 12+8 still fits; then 18+8 does not. Counters starting from zero would admit three.
  auto r = client.post("/v1/chat/completions", tokens, three_words(5));
  REQUIRE(r.status == 200);
  CHECK(r.header("x-ratelimit-remaining-tokens") == "0");
  check_rate_limited(client.post("/v1/chat/completions", tokens, three_words(5)), 86'400);
}

TEST_CASE("bad requests are admitted first: they count against the limits and are metered", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto unknown_key = create_key(db, "alice", {"--rpm", "3"});
  auto json_key = create_key(db, "bob", {"--rpm", "2"});
  auto restricted_key = create_key(db, "carol", {"--rpm", "2", "--models", "echo"});
  GatewayProcess gw(dir, {kConfig, db, {}});

  auto minute = fresh_window(kMinuteMs, 10s);
  HttpClient client(gw.port());
  std::vector<int> statuses;
  for (int i = 0; i < 5; ++i) {
    auto r = client.post("/v1/chat/completions", unknown_key, chat_body("no-such-model", "hi"));
    statuses.push_back(r.status);
    CHECK(r.header("x-ratelimit-limit-requests") == "3");
    if (r.status == 429) check_rate_limited(r, 60);
  }
  CHECK(statuses == std::vector<int>{404, 404, 404, 429, 429});

  statuses.clear();
  for (int i = 0; i < 3; ++i) statuses.push_back(client.post("/v1/chat/completions", json_key, "{not json").status);
  CHECK(statuses == std::vector<int>{400, 400, 429});

  statuses.clear();
  for (int i = 0; i < 3; ++i) {
    statuses.push_back(client.post("/v1/chat/completions", restricted_key, chat_body("echo2", "hi")).status);
  }
  CHECK(statuses == std::vector<int>{403, 403, 429});
  // The refusals used the window up: the allowed model is refused too.
  CHECK(client.post("/v1/chat/completions", restricted_key, chat_body("echo", "hi")).status == 429);
  REQUIRE(epoch_ms() / kMinuteMs == minute);

  // One usage row per request, the admitted ones counted.
  for (int i = 0; i < 100 && count_usage_rows(db) < 12; ++i) std::this_thread::sleep_for(50ms);
  CHECK(count_usage_rows(db) == 12);
  CHECK(count_usage_rows(db, "model = 'no-such-model' AND status = 404 AND counted = 1") == 3);
  CHECK(count_usage_rows(db, "model = 'no-such-model' AND status = 429 AND counted = 0") == 2);
  CHECK(count_usage_rows(db, "status = 400 AND counted = 1") == 2);
  CHECK(count_usage_rows(db, "model = 'echo2' AND status = 403 AND counted = 1") == 2);
}

TEST_CASE("a real completion still reserves its prompt and max_tokens before it runs", "[e2e][quota]") {
  TempDir dir;
  auto db = dir.file("quota.db");
  auto key = create_key(db, "alice", {"--tpm", "100"});
  GatewayProcess gw(dir, {kConfig, db, {}});
  auto minute = fresh_window(kMinuteMs, 10s);
  HttpClient client(gw.port());
  // More than the whole budget as max_tokens: refused before it runs.
  auto big = client.post("/v1/chat/completions", key, chat_body("echo", "hi", R"("max_tokens":200)"));
  check_rate_limited(big, 60);
  // An unknown model reserves nothing, so it is not refused for tokens.
  CHECK(client.post("/v1/chat/completions", key, chat_body("no-such-model", "hi", R"("max_tokens":200)")).status ==
        404);
  CHECK(client.post("/v1/chat/completions", key, chat_body("echo", "hi", R"("max_tokens":20)")).status == 200);
  REQUIRE(epoch_ms() / kMinuteMs == minute);
}
