#include "metering/quota.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

namespace mt = tollgate::metering;

namespace {

constexpr mt::EpochMs kSecond = 1000;
constexpr mt::EpochMs kMinute = 60 * kSecond;
constexpr mt::EpochMs kDay = 24 * 60 * kMinute;

// 2026-03-10T12:00:00Z, the start of a minute in the middle of a day and month.
constexpr mt::EpochMs kNoon = 1773144000 * kSecond;

mt::QuotaSubject subject(std::int64_t user_id, std::int64_t key_id, mt::Limits user_limits,
                         mt::Limits key_limits = {}) {
  return mt::QuotaSubject{user_id, key_id, user_limits, key_limits};
}

mt::Limits rpm(std::int64_t n) {
  mt::Limits l;
  l.requests_per_minute = n;
  return l;
}

mt::Limits tpm(std::int64_t n) {
  mt::Limits l;
  l.tokens_per_minute = n;
  return l;
}

}  // namespace

TEST_CASE("civil date arithmetic matches known dates", "[metering][quota]") {
  REQUIRE(mt::parse_utc_time("2026-03-10T12:00:00Z") == kNoon);

  SECTION("the epoch") {
    CHECK(mt::day_index(0) == 0);
    CHECK(mt::month_index(0) == 0);
    CHECK(mt::minute_index(0) == 0);
    CHECK(mt::day_string(0) == "1970-01-01");
    CHECK(mt::next_day_start(0) == kDay);
    CHECK(mt::next_month_start(0) == 31 * kDay);  // 1970-02-01
    CHECK(mt::next_minute_start(0) == kMinute);
  }
  SECTION("a leap day") {
    const mt::EpochMs leap_day = 1709164800 * kSecond;  // 2024-02-29T00:00:00Z
    CHECK(mt::day_string(leap_day) == "2024-02-29");
    CHECK(mt::day_string(leap_day + kDay - 1) == "2024-02-29");
    CHECK(mt::day_string(leap_day + kDay) == "2024-03-01");
    CHECK(mt::day_index(leap_day) == 19782);
    CHECK(mt::month_index(leap_day) == 54 * 12 + 1);
    CHECK(mt::next_month_start(leap_day) == leap_day + kDay);              // 2024-03-01
    CHECK(mt::next_month_start(leap_day - 28 * kDay) == leap_day + kDay);  // from 2024-02-01
  }
  SECTION("the last day of a year") {
    const mt::EpochMs new_year_2027 = 1798761600 * kSecond;
    const mt::EpochMs last_day = new_year_2027 - kDay;  // 2026-12-31
    CHECK(mt::day_string(last_day) == "2026-12-31");
    CHECK(mt::next_month_start(last_day) == new_year_2027);
    CHECK(mt::next_month_start(new_year_2027 - 1) == new_year_2027);
    CHECK(mt::next_day_start(new_year_2027 - 1) == new_year_2027);
    CHECK(mt::month_index(new_year_2027 - 1) == 56 * 12 + 11);
    CHECK(mt::month_index(new_year_2027) == 57 * 12);
    CHECK(mt::day_string(new_year_2027) == "2027-01-01");
  }
  SECTION("instants before the epoch fall in earlier windows") {
    CHECK(mt::day_index(-1) == -1);
    CHECK(mt::minute_index(-1) == -1);
    CHECK(mt::month_index(-1) == -1);
    CHECK(mt::day_string(-1) == "1969-12-31");
    CHECK(mt::next_day_start(-1) == 0);
  }
  SECTION("minute windows") {
    CHECK(mt::minute_index(kNoon + 59 * kSecond) == mt::minute_index(kNoon));
    CHECK(mt::minute_index(kNoon + kMinute) == mt::minute_index(kNoon) + 1);
    CHECK(mt::next_minute_start(kNoon + 1) == kNoon + kMinute);
  }
}

TEST_CASE("parse_utc_time accepts dates and times in UTC only", "[metering][quota]") {
  const mt::EpochMs leap_day = 1709164800 * kSecond;
  CHECK(mt::parse_utc_time("2024-02-29") == leap_day);
  CHECK(mt::parse_utc_time("2024-02-29T13:45") == leap_day + (13 * 3600 + 45 * 60) * kSecond);
  CHECK(mt::parse_utc_time("2024-02-29T13:45Z") == leap_day + (13 * 3600 + 45 * 60) * kSecond);
  CHECK(mt::parse_utc_time("2024-02-29T13:45:30") == leap_day + (13 * 3600 + 45 * 60 + 30) * kSecond);
  CHECK(mt::parse_utc_time("2024-02-29T23:59:59Z") == leap_day + kDay - kSecond);
  CHECK(mt::parse_utc_time("1970-01-01T00:00:00Z") == 0);
  CHECK(mt::parse_utc_time("2000-02-29") == 951782400 * kSecond);

  for (const char* bad : {"",
                          "2023-02-29",
                          "1900-02-29",
                          "2024-13-01",
                          "2024-00-10",
                          "2024-04-31",
                          "2024-01-00",
                          "2024-02-29T24:00",
                          "2024-02-29T12:60",
                          "2024-02-29T12:00:60",
                          "2024-2-29",
                          "2024-02-29 12:00",
                          "2024-02-29Z",
                          "2024-02-29T12",
                          "2024-02-29T12:00:00+01:00",
                          "2024-02-29T12:00:00ZZ",
                          "abcd-ef-gh",
                          "2024-02-29T12:00:00.5",
                          "+024-02-29",
                          "2024/02/29"}) {
    INFO(bad);
    CHECK_FALSE(mt::parse_utc_time(bad).has_value());
  }
}

TEST_CASE("format_reset uses OpenAI's duration format", "[metering][quota]") {
  CHECK(mt::format_reset(0) == "0s");
  CHECK(mt::format_reset(250) == "250ms");
  CHECK(mt::format_reset(999) == "999ms");
  CHECK(mt::format_reset(1000) == "1s");
  CHECK(mt::format_reset(1001) == "2s");
  CHECK(mt::format_reset(59'001) == "1m0s");
  CHECK(mt::format_reset(360'000) == "6m0s");
  CHECK(mt::format_reset(3'723'000) == "1h2m3s");
  CHECK(mt::format_reset(7'200'000) == "2h0m0s");
}

TEST_CASE("requests per minute admits exactly the limit", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  const auto s = subject(1, 10, rpm(10));
  for (int i = 0; i < 10; ++i) {
    INFO("request " << i);
    REQUIRE(limiter.admit(s, 0, kNoon + 15 * kSecond).allowed);
  }
  const mt::Admission refused = limiter.admit(s, 0, kNoon + 15 * kSecond);
  REQUIRE_FALSE(refused.allowed);
  CHECK(refused.reason == "requests per minute limit (10) reached for this user");
  CHECK(refused.retry_after_s == 45);
  REQUIRE(refused.status.requests);
  CHECK(refused.status.requests->remaining == 0);

  // Rounded up, never zero.
  CHECK(limiter.admit(s, 0, kNoon + kMinute - 1).retry_after_s == 1);
  CHECK(limiter.admit(s, 0, kNoon + kMinute - 1001).retry_after_s == 2);

  // The next minute starts from zero.
  for (int i = 0; i < 10; ++i) REQUIRE(limiter.admit(s, 0, kNoon + kMinute + i).allowed);
  CHECK_FALSE(limiter.admit(s, 0, kNoon + kMinute + 10).allowed);
}

TEST_CASE("user and key limits are both enforced", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  const auto key_a = subject(1, 100, rpm(5), rpm(3));
  const auto key_b = subject(1, 200, rpm(5));

  for (int i = 0; i < 3; ++i) REQUIRE(limiter.admit(key_a, 0, kNoon).allowed);
  const mt::Admission by_key = limiter.admit(key_a, 0, kNoon);
  REQUIRE_FALSE(by_key.allowed);
  CHECK(by_key.reason == "requests per minute limit (3) reached for this key");

  // Key B has no limit of its own but shares the user's five requests.
  REQUIRE(limiter.admit(key_b, 0, kNoon).allowed);
  REQUIRE(limiter.admit(key_b, 0, kNoon).allowed);
  const mt::Admission by_user = limiter.admit(key_b, 0, kNoon);
  REQUIRE_FALSE(by_user.allowed);
  CHECK(by_user.reason == "requests per minute limit (5) reached for this user");

  // Another user with the same key id namespace is independent.
  CHECK(limiter.admit(subject(2, 300, rpm(5)), 0, kNoon).allowed);
}

TEST_CASE("refusals report the longest wait among failing limits", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits limits = rpm(1);
  limits.requests_per_day = 1;
  const auto s = subject(1, 1, limits);
  REQUIRE(limiter.admit(s, 0, kNoon).allowed);
  const mt::Admission refused = limiter.admit(s, 0, kNoon + 10 * kSecond);
  REQUIRE_FALSE(refused.allowed);
  CHECK(refused.retry_after_s == 12 * 3600 - 10);
  CHECK(refused.reason == "requests per day limit (1) reached for this user");
}

TEST_CASE("tokens are reserved at admission and settled afterwards", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits limits = tpm(1000);
  limits.tokens_per_day = 10'000;
  const auto s = subject(1, 1, limits);

  const mt::Admission first = limiter.admit(s, 100, kNoon);
  REQUIRE(first.allowed);
  CHECK(first.reserved_tokens == 100);
  REQUIRE(first.status.tokens);
  CHECK(first.status.tokens->limit == 1000);
  CHECK(first.status.tokens->remaining == 900);

  limiter.settle(first, 30, kNoon + kSecond);
  REQUIRE(limiter.status(s, kNoon + kSecond).tokens);
  CHECK(limiter.status(s, kNoon + kSecond).tokens->remaining == 970);

  REQUIRE(limiter.admit(s, 970, kNoon + 2 * kSecond).allowed);
  const mt::Admission refused = limiter.admit(s, 1, kNoon + 2 * kSecond);
  REQUIRE_FALSE(refused.allowed);
  CHECK(refused.reason == "tokens per minute limit (1000) reached for this user");
  CHECK(refused.retry_after_s == 58);

  SECTION("a settle reaching past the limit blocks further requests") {
    const mt::Admission next = limiter.admit(s, 0, kNoon + kMinute);
    REQUIRE(next.allowed);
    limiter.settle(next, 1500, kNoon + kMinute + kSecond);
    CHECK(limiter.status(s, kNoon + kMinute).tokens->remaining == 0);
    CHECK_FALSE(limiter.admit(s, 0, kNoon + kMinute + 2 * kSecond).allowed);
  }
}

TEST_CASE("settle leaves windows that rolled over alone", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits limits = tpm(1000);
  limits.tokens_per_day = 10'000;
  const auto s = subject(1, 1, {}, limits);  // key limits this time

  const mt::Admission old = limiter.admit(s, 100, kNoon);
  REQUIRE(old.allowed);
  REQUIRE(limiter.admit(s, 0, kNoon + kMinute).allowed);  // the minute rolls over
  limiter.settle(old, 500, kNoon + kMinute + kSecond);

  // This minute saw none of those tokens; the day saw all 500.
  mt::Limits day_only;
  day_only.tokens_per_day = 10'000;
  CHECK(limiter.status(subject(1, 1, {}, tpm(1000)), kNoon + kMinute).tokens->remaining == 1000);
  CHECK(limiter.status(subject(1, 1, {}, day_only), kNoon + kMinute).tokens->remaining == 9500);
  CHECK(limiter.status(subject(1, 1, day_only), kNoon + kMinute).tokens->remaining == 9500);
}

TEST_CASE("token counts never go below zero", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  const auto s = subject(1, 1, tpm(1000));
  const mt::Admission a = limiter.admit(s, 400, kNoon);
  REQUIRE(a.allowed);
  limiter.restore({}, kNoon);  // the reservation is forgotten
  limiter.settle(a, 0, kNoon + kSecond);
  CHECK(limiter.status(s, kNoon + kSecond).tokens->remaining == 1000);
  // 1000 more tokens fit, not 1400.
  REQUIRE(limiter.admit(s, 1000, kNoon + kSecond).allowed);
  CHECK_FALSE(limiter.admit(s, 1, kNoon + kSecond).allowed);
}

TEST_CASE("a reservation larger than a token limit can never pass", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits limits = tpm(1000);
  limits.requests_per_day = 1;
  const auto s = subject(1, 1, {}, limits);
  REQUIRE(limiter.admit(s, 10, kNoon).allowed);

  // Both limits fail; the one no waiting can fix is named.
  const mt::Admission refused = limiter.admit(s, 1500, kNoon);
  REQUIRE_FALSE(refused.allowed);
  CHECK(refused.reason == "request's max tokens (1500) exceed the tokens per minute limit (1000) for this key");
  CHECK(refused.retry_after_s == 12 * 3600);
}

TEST_CASE("a refused request changes no counter", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits limits = rpm(2);
  limits.tokens_per_minute = 1000;
  const auto s = subject(1, 1, limits, rpm(5));

  REQUIRE(limiter.admit(s, 600, kNoon).allowed);
  const mt::RateLimitStatus before = limiter.status(s, kNoon);
  const mt::Admission refused = limiter.admit(s, 600, kNoon);
  REQUIRE_FALSE(refused.allowed);
  limiter.settle(refused, 0, kNoon);  // settling a refusal is a no-op

  const mt::RateLimitStatus after = limiter.status(s, kNoon);
  REQUIRE(after.requests);
  REQUIRE(after.tokens);
  CHECK(after.requests->remaining == before.requests->remaining);
  CHECK(after.requests->remaining == 1);
  CHECK(after.tokens->remaining == 400);
  CHECK(refused.status.tokens->remaining == 400);
  REQUIRE(limiter.admit(s, 400, kNoon).allowed);
}

TEST_CASE("restore continues from the stored counts", "[metering][quota]") {
  mt::Store::QuotaState state;
  state.users[7].minute = {4, 100};
  state.users[7].day = {50, 2000};
  state.users[7].month = {60, 9000};
  state.keys[70].minute = {2, 0};

  mt::QuotaLimiter limiter;
  limiter.restore(state, kNoon + kSecond);

  mt::Limits user_limits = rpm(5);
  user_limits.tokens_per_month = 10'000;
  const auto s = subject(7, 70, user_limits, rpm(10));
  const mt::RateLimitStatus restored = limiter.status(s, kNoon + kSecond);
  CHECK(restored.requests->remaining == 1);
  CHECK(restored.tokens->remaining == 1000);

  REQUIRE(limiter.admit(s, 0, kNoon + 2 * kSecond).allowed);
  const mt::Admission refused = limiter.admit(s, 0, kNoon + 2 * kSecond);
  REQUIRE_FALSE(refused.allowed);
  CHECK(refused.reason == "requests per minute limit (5) reached for this user");
  // The month still holds 9000 tokens after the minute rolls over.
  CHECK_FALSE(limiter.admit(s, 1001, kNoon + kMinute).allowed);
  CHECK(limiter.admit(s, 1000, kNoon + kMinute).allowed);
}

TEST_CASE("concurrent admissions admit exactly the limit", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  const auto s = subject(1, 1, rpm(1000));
  std::atomic<int> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        if (limiter.admit(s, 1, kNoon + kSecond).allowed) allowed.fetch_add(1);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(allowed.load() == 1000);
  CHECK(limiter.status(s, kNoon + kSecond).requests->remaining == 0);
}

TEST_CASE("status reports the most constraining dimension of each kind", "[metering][quota]") {
  mt::QuotaLimiter limiter;
  mt::Limits user_limits = rpm(10);
  user_limits.requests_per_day = 100;
  user_limits.tokens_per_day = 5000;
  const auto s = subject(1, 1, user_limits, tpm(1000));
  const mt::EpochMs now = kNoon + 15 * kSecond;

  SECTION("before any request") {
    const mt::RateLimitStatus st = limiter.status(s, now);
    REQUIRE(st.requests);
    CHECK(st.requests->limit == 10);
    CHECK(st.requests->remaining == 10);
    REQUIRE(st.tokens);
    CHECK(st.tokens->limit == 1000);
    CHECK(st.tokens->remaining == 1000);
  }
  SECTION("after an admission") {
    const mt::Admission a = limiter.admit(s, 200, now);
    REQUIRE(a.allowed);
    REQUIRE(a.status.requests);
    CHECK(a.status.requests->limit == 10);
    CHECK(a.status.requests->remaining == 9);
    CHECK(a.status.requests->reset_ms == 45 * kSecond);
    REQUIRE(a.status.tokens);
    CHECK(a.status.tokens->limit == 1000);
    CHECK(a.status.tokens->remaining == 800);
    CHECK(a.status.tokens->reset_ms == 45 * kSecond);
    CHECK(mt::format_reset(a.status.tokens->reset_ms) == "45s");
  }
  SECTION("the day limit takes over when it is tighter") {
    for (int i = 0; i < 4; ++i) REQUIRE(limiter.admit(s, 1000, now + i * kMinute).allowed);
    const mt::Admission a = limiter.admit(s, 500, now + 4 * kMinute);
    REQUIRE(a.allowed);
    CHECK(a.status.tokens->limit == 5000);
    CHECK(a.status.tokens->remaining == 500);
    CHECK(a.status.tokens->reset_ms == 12 * 3600 * kSecond - 15 * kSecond - 4 * kMinute);
  }
  SECTION("no limits, no status") {
    const mt::Admission a = limiter.admit(subject(2, 2, {}), 50, now);
    REQUIRE(a.allowed);
    CHECK_FALSE(a.status.requests.has_value());
    CHECK_FALSE(a.status.tokens.has_value());
  }
}
