// In-memory quota counters for users and keys in fixed UTC windows (minute,
// day, month). Admission checks and reserves under one lock, so N concurrent
// requests against a limit of L admit exactly L.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

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
  std::string reason;  // when refused: which limit, e.g. "requests per minute limit (10) reached for key tg-abc"
  std::int64_t retry_after_s = 0;  // when refused: seconds until that window resets (>= 1)
  std::string limit;               // when refused: which limit, as a metric label, e.g. "requests_per_minute"
  RateLimitStatus status;          // after this request's reservation

  // Needed by settle().
  std::int64_t user_id = 0;
  std::int64_t key_id = 0;
  std::int64_t reserved_tokens = 0;
  EpochMs admitted_at = 0;
};

class QuotaLimiter {
 public:
  // Refuses when any limit of the user or the key would be exceeded by one more
  // request or by `reserve_tokens` more tokens; otherwise counts the request and
  // reserves the tokens. A refused request changes no counter.
  Admission admit(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now);

  // Replaces the reservation by the real token count, in the windows that are
  // still current (a window that has rolled over since admission is left alone).
  void settle(const Admission& admission, std::int64_t actual_tokens, EpochMs now);

  // Current status without admitting (for responses that were not admitted,
  // e.g. 403 on a model the key may not use).
  RateLimitStatus status(const QuotaSubject& subject, EpochMs now);

  // Rebuilds the counters from the store's current-window counts (at start).
  void restore(const Store::QuotaState& state, EpochMs now);

 private:
  struct Window {
    std::int64_t id = -1;  // which minute/day/month this counts
    std::int64_t requests = 0;
    std::int64_t tokens = 0;
  };
  struct Counters {
    Window minute, day, month;
  };

  // Zeroes every window of `c` that is not the one containing `now`.
  static void roll(Counters& c, EpochMs now);
  // The counts of `c` in the windows containing `now` (zero for stale windows).
  static SubjectUsage current_usage(const Counters* c, EpochMs now);

  std::mutex mutex_;
  std::unordered_map<std::int64_t, Counters> users_;
  std::unordered_map<std::int64_t, Counters> keys_;
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
