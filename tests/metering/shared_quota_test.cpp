// Limiters sharing their budgets through one store (QuotaLimiter::share_budgets),
// as replicas on one database do: here on one SQLite file, each limiter with
// its own connection. tests/postgres/ runs gateway replicas on PostgreSQL.
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "tests/metering/temp_database.hpp"

namespace mt = tollgate::metering;
using namespace std::chrono_literals;

namespace {

// Windows are real here (the sharing thread reads the clock): keep clear of a day's end.
void away_from_day_end() {
  const mt::EpochMs left = mt::next_day_start(mt::now_ms()) - mt::now_ms();
  if (left < 10'000) std::this_thread::sleep_for(std::chrono::milliseconds(left + 100));
}

struct Replicas {
  explicit Replicas(int n, std::chrono::milliseconds idle_return = 1000ms) {
    away_from_day_end();
    for (int i = 0; i < n; ++i) {
      limiters.push_back(std::make_unique<mt::QuotaLimiter>());
      limiters.back()->share_budgets(mt::open_sqlite_store(db.path()), mt::BudgetSharing{idle_return, false});
    }
  }
  mt::QuotaLimiter& operator[](std::size_t i) { return *limiters[i]; }

  mt::test::TempDatabase db;
  std::vector<std::unique_ptr<mt::QuotaLimiter>> limiters;
};

// What the gateway does: admit, and claim while the leases fall short.
mt::Admission admit(mt::QuotaLimiter& limiter, const mt::QuotaSubject& subject, std::int64_t reserve) {
  const mt::EpochMs now = mt::now_ms();
  mt::Admission a = limiter.admit(subject, reserve, now);
  for (int i = 0; a.pending && i < 8; ++i) a = limiter.claim(subject, reserve, now);
  REQUIRE_FALSE(a.pending);
  return a;
}

mt::QuotaSubject key_limited(mt::Limits limits) { return mt::QuotaSubject{1, 7, {}, limits}; }

mt::Limits rpd(std::int64_t n) {
  mt::Limits l;
  l.requests_per_day = n;
  return l;
}

mt::Limits tpd(std::int64_t n) {
  mt::Limits l;
  l.tokens_per_day = n;
  return l;
}

}  // namespace

TEST_CASE("replicas sharing budgets admit exactly the limit between them", "[metering][quota][shared]") {
  const std::int64_t limit = GENERATE(20, 1000);
  Replicas replicas(3);
  const auto subject = key_limited(rpd(limit));
  std::atomic<std::int64_t> allowed{0}, refused{0};
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      for (std::int64_t i = 0; i < limit + limit / 2; ++i) {
        const mt::Admission a = admit(replicas[r], subject, 0);
        (a.allowed ? allowed : refused)++;
        if (!a.allowed) {
          CHECK(a.refusal_status == 429);
          CHECK(a.limit == "requests_per_day");
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(allowed.load() <= limit);
  CHECK(allowed + refused == 3 * (limit + limit / 2));
  if (limit < 65) CHECK(allowed.load() == limit);  // a small budget is never leased beyond one need

  // A lease a replica stopped drawing on goes back: what is left is there for the others.
  std::this_thread::sleep_for(1500ms);
  std::int64_t more = 0;
  for (int i = 0; i < 200 && admit(replicas[i % 3], subject, 0).allowed; ++i) ++more;
  CHECK(allowed + more == limit);
}

TEST_CASE("a shared token budget reserves, settles and charges use past a reservation", "[metering][quota][shared]") {
  Replicas replicas(2);
  const auto subject = key_limited(tpd(300));

  mt::Admission a = admit(replicas[0], subject, 100);
  REQUIRE(a.allowed);
  replicas[0].settle(a, 250, mt::now_ms());  // 150 past the reservation: charged to the budget

  // The other replica sees 250 of 300 used once the charge is written (the next tick, 100 ms).
  std::this_thread::sleep_for(500ms);
  CHECK_FALSE(admit(replicas[1], subject, 60).allowed);
  std::this_thread::sleep_for(300ms);  // a refused budget is not asked again for 250 ms
  mt::Admission fits = admit(replicas[1], subject, 50);
  CHECK(fits.allowed);
  CHECK(fits.status.tokens);
  if (fits.status.tokens) CHECK(fits.status.tokens->remaining == 0);
}

TEST_CASE("an idle lease goes back after idle_return, and every lease at stop", "[metering][quota][shared]") {
  Replicas replicas(2, 300ms);
  const auto subject = key_limited(tpd(10'000));
  REQUIRE(admit(replicas[0], subject, 1).allowed);  // leases 1 + 9999 / 16

  // The rest of the budget is not all there while replica 0 holds its lease...
  CHECK_FALSE(admit(replicas[1], subject, 9'999).allowed);
  // ... and is once replica 0 has given it back.
  std::this_thread::sleep_for(700ms);
  CHECK(admit(replicas[1], subject, 9'999).allowed);
  CHECK_FALSE(admit(replicas[0], subject, 1).allowed);

  const mt::QuotaSubject other_key{1, 8, {}, tpd(5'000)};
  REQUIRE(admit(replicas[0], other_key, 1).allowed);
  replicas[0].stop_sharing();
  CHECK(admit(replicas[1], other_key, 4'999).allowed);  // given back at stop, at once
}

TEST_CASE("a replica holding too little of a budget for a request gives it back for the others",
          "[metering][quota][shared]") {
  Replicas replicas(2);
  const auto subject = key_limited(tpd(100));
  // Each holds a part; neither part alone is enough for 60, together they are.
  mt::Admission a = admit(replicas[0], subject, 50);
  mt::Admission b = admit(replicas[1], subject, 50);
  REQUIRE(a.allowed);
  REQUIRE(b.allowed);
  replicas[0].settle(a, 20, mt::now_ms());               // replica 0 holds 30
  replicas[1].settle(b, 20, mt::now_ms());               // replica 1 holds 30
  CHECK_FALSE(admit(replicas[0], subject, 60).allowed);  // gives its 30 back, 30 is not 60: refused
  CHECK(admit(replicas[1], subject, 60).allowed);        // its 30 and the 30 given back
}
