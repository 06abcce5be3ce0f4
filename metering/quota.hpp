// In-memory quota counters for users and keys in fixed UTC windows (minute,
// day, month). Admission checks and reserves under one lock, so N concurrent
// requests against a limit of L admit exactly L.
//
// Several replicas on one database share their limits (share_budgets): each
// admits from leases it claims from the store's budgets, so the limit holds
// across them (docs/quotas.md).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "metering/store.hpp"
#include "metering/types.hpp"

namespace tollgate::metering {

// What the x-ratelimit-* headers report: the most constraining request
// dimension and the most constraining token dimension. Empty when no limit of
// that kind applies.
struct RateLimitStatus {
  struct Dimension {
    std::int64_t limit = 0;
    std::int64_t remaining = 0;
    std::int64_t reset_ms = 0;  // until the window resets
  };
  std::optional<Dimension> requests;
  std::optional<Dimension> tokens;
};

struct QuotaSubject {
  std::int64_t user_id = 0;
  std::int64_t key_id = 0;
  Limits user_limits;
  Limits key_limits;
};

struct Admission {
  bool allowed = false;
  // Shared budgets only: this replica's leases do not cover the request;
  // QuotaLimiter::claim() decides it. Neither allowed nor refused yet.
  bool pending = false;
  std::vector<BudgetClaim> claims;  // what claim() asks the store for
  int refusal_status = 429;         // 503 when the budgets' store is unreachable and the limiter fails closed
  std::string reason;  // when refused: which limit, e.g. "requests per minute limit (10) reached for key tg-abc"
  std::int64_t retry_after_s = 0;  // when refused: seconds until that window resets (>= 1)
  std::string limit;               // when refused: which limit, as a metric label, e.g. "requests_per_minute"
  RateLimitStatus status;          // after this request's reservation

  // Needed by settle().
  std::int64_t user_id = 0;
  std::int64_t key_id = 0;
  std::int64_t reserved_tokens = 0;
  EpochMs admitted_at = 0;
  unsigned leased_tokens =
      0;  // shared budgets: which token windows (bit side * 3 + span) the reservation took a lease from
};

// How a limiter shares budgets with the other replicas on its store.
struct BudgetSharing {
  // A lease not drawn on this long goes back to the shared budget.
  std::chrono::milliseconds idle_return{1000};
  // The store unreachable: admit requests under a limit past their leases
  // (charged when it is back) rather than refuse them with a 503.
  bool fail_open = false;
};

// Whether the shared budgets' store answers, for /readyz.
struct BudgetStoreHealth {
  bool shared = false;  // budgets are shared at all
  bool reachable = true;
  std::string error;  // the last failure while unreachable
  EpochMs unreachable_since = 0;
};

class QuotaLimiter {
 public:
  QuotaLimiter() = default;
  ~QuotaLimiter();  // stop_sharing()s
  QuotaLimiter(const QuotaLimiter&) = delete;
  QuotaLimiter& operator=(const QuotaLimiter&) = delete;

  // Refuses when any limit of the user or the key would be exceeded by one more
  // request or by `reserve_tokens` more tokens; otherwise counts the request and
  // reserves the tokens. A refused request changes no counter. With shared
  // budgets, may come back `pending`: then call claim().
  Admission admit(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now);

  // From here on, every limit is a budget in `store` shared with the other
  // replicas using it. A thread gives idle leases back and charges use past
  // them. Call once, before serving.
  void share_budgets(std::unique_ptr<Store> store, BudgetSharing sharing);
  // Gives every lease back and stops that thread. Idempotent.
  void stop_sharing();
  // For a `pending` admission: claims the leases it lacks from the store
  // (waits on the database: never on an io thread) and admits or refuses as
  // admit() does. Pending again only when requests on other threads took the
  // leases claimed meanwhile; the caller retries a bounded number of times.
  Admission claim(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now);
  BudgetStoreHealth store_health();

  // Replaces the reservation by the real token count, in the windows that are
  // still current (a window that has rolled over since admission is left alone).
  void settle(const Admission& admission, std::int64_t actual_tokens, EpochMs now);

  // Current status without admitting (for responses that were not admitted,
  // e.g. 403 on a model the key may not use).
  RateLimitStatus status(const QuotaSubject& subject, EpochMs now);

  // Rebuilds the counters from the store's current-window counts (at start).
  void restore(const Store::QuotaState& state, EpochMs now);

 private:
  // This replica's share of one shared budget.
  struct Lease {
    std::int64_t held = 0;        // claimed and not used yet; below zero: used past it, to be charged
    std::int64_t pool_left = -1;  // what the shared budget had left at the last claim; -1: not known
    EpochMs last_use = 0;
    EpochMs refused_at = -1;  // a claim on it was refused then: the budget is spent
  };
  struct Window {
    std::int64_t id = -1;  // which minute/day/month this counts
    std::int64_t requests = 0;
    std::int64_t tokens = 0;
    Lease request_lease, token_lease;  // shared budgets only
  };
  struct Counters {
    Window minute, day, month;
  };

  // Zeroes every window of `c` that is not the one containing `now`.
  static void roll(Counters& c, EpochMs now);
  // The counts of `c` in the windows containing `now` (zero for stale windows).
  static SubjectUsage current_usage(const Counters* c, EpochMs now);

  static Window& window_of(Counters& c, unsigned span);  // 0 minute, 1 day, 2 month
  Admission admit_locked(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now);
  SubjectUsage effective_usage(const Counters& c, const Limits& limits, EpochMs now) const;
  Lease* lease_for(const BudgetClaim& claim, EpochMs now);
  bool store_down_locked(EpochMs now) const;
  void mark_store_down(const std::string& error, EpochMs now);
  void run_sharing();
  void settle_leases(EpochMs now, bool everything);

  std::mutex mutex_;
  std::unordered_map<std::int64_t, Counters> users_;
  std::unordered_map<std::int64_t, Counters> keys_;

  // Shared budgets (share_budgets); guarded by mutex_ unless said.
  std::unique_ptr<Store> store_;  // its own connection; serialises its own calls
  BudgetSharing sharing_;
  bool shared_ = false;
  EpochMs down_since_ = -1;   // the store failed then and has not answered since
  EpochMs last_failure_ = 0;  // when a store call last failed
  std::string down_error_;
  bool stop_ = false;
  std::condition_variable wake_;
  std::thread thread_;  // gives leases back; joined by stop_sharing()
  std::mutex stop_mutex_;
};

// UTC window arithmetic, exposed for tests and reports.
std::int64_t minute_index(EpochMs t);
std::int64_t day_index(EpochMs t);    // days since 1970-01-01
std::int64_t month_index(EpochMs t);  // months since 1970-01
EpochMs next_minute_start(EpochMs t);
EpochMs next_day_start(EpochMs t);
EpochMs next_month_start(EpochMs t);
std::string day_string(EpochMs t);  // YYYY-MM-DD
// Parses "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM[:SS][Z]" (UTC) to epoch ms.
std::optional<EpochMs> parse_utc_time(std::string_view text);

// OpenAI's reset format: "1s", "6m0s", "1h2m3s"; sub-second values as "250ms".
std::string format_reset(std::int64_t ms);

}  // namespace tollgate::metering
