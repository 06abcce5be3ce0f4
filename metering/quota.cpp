#include "metering/quota.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>

namespace tollgate::metering {

namespace {

constexpr std::int64_t kMsPerSecond = 1'000;
constexpr std::int64_t kMsPerMinute = 60'000;
constexpr std::int64_t kMsPerDay = 86'400'000;

// Rounds towards minus infinity, so instants before 1970 land in the right window.
std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  std::int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

struct CivilDate {
  std::int64_t year;
  unsigned month;  // 1..12
  unsigned day;    // 1..31
};

// Howard Hinnant's days_from_civil / civil_from_days ("chrono-Compatible
// Low-Level Date Algorithms"): proleptic Gregorian calendar, eras of 400 years
// starting on March 1st so the leap day is the last day of the year.
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = floor_div(y, 400);
  const auto yoe = static_cast<unsigned>(y - era * 400);                 // [0, 399]
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;  // [0, 365]
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;            // [0, 146096]
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

CivilDate civil_from_days(std::int64_t z) {
  z += 719468;
  const std::int64_t era = floor_div(z, 146097);
  const auto doe = static_cast<unsigned>(z - era * 146097);                    // [0, 146096]
  const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;  // [0, 399]
  const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);                // [0, 365]
  const unsigned mp = (5 * doy + 2) / 153;                                     // [0, 11]
  const unsigned d = doy - (153 * mp + 2) / 5 + 1;                             // [1, 31]
  const unsigned m = mp < 10 ? mp + 3 : mp - 9;                                // [1, 12]
  const std::int64_t y = static_cast<std::int64_t>(yoe) + era * 400 + (m <= 2);
  return {y, m, d};
}

bool is_leap_year(std::int64_t y) { return y % 4 == 0 && (y % 100 != 0 || y % 400 == 0); }

unsigned days_in_month(std::int64_t y, unsigned m) {
  static constexpr std::array<unsigned, 12> kDays{31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return m == 2 && is_leap_year(y) ? 29 : kDays[m - 1];
}

// Reads exactly `n` decimal digits at `pos`; nullopt on anything else.
std::optional<unsigned> read_digits(std::string_view text, std::size_t pos, std::size_t n) {
  if (pos + n > text.size()) return std::nullopt;
  unsigned value = 0;
  for (std::size_t i = pos; i < pos + n; ++i) {
    const char c = text[i];
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  return value;
}

// A shared budget that refused a claim is not asked again for this long.
constexpr std::chrono::milliseconds kSpentFor{250};
// After a failed call the budgets' store is left alone for this long.
constexpr std::int64_t kStoreRetryMs = 1'000;
// How often the sharing thread looks for idle leases, and purges old budgets.
constexpr std::chrono::milliseconds kSharingTick{100};
constexpr std::int64_t kPurgeEveryMs = 60'000;
constexpr std::int64_t kKeepEndedBudgetsMs = 600'000;

enum class Span { minute, day, month };
enum class Kind { requests, tokens };

struct LimitRule {
  const char* name;
  const char* label;
  Kind kind;
  Span span;
  std::optional<std::int64_t> Limits::*limit;
};

constexpr std::array<LimitRule, 5> kRules{{
    {"requests per minute", "requests_per_minute", Kind::requests, Span::minute, &Limits::requests_per_minute},
    {"requests per day", "requests_per_day", Kind::requests, Span::day, &Limits::requests_per_day},
    {"tokens per minute", "tokens_per_minute", Kind::tokens, Span::minute, &Limits::tokens_per_minute},
    {"tokens per day", "tokens_per_day", Kind::tokens, Span::day, &Limits::tokens_per_day},
    {"tokens per month", "tokens_per_month", Kind::tokens, Span::month, &Limits::tokens_per_month},
}};

EpochMs window_end(Span span, EpochMs now) {
  switch (span) {
    case Span::minute:
      return next_minute_start(now);
    case Span::day:
      return next_day_start(now);
    case Span::month:
      return next_month_start(now);
  }
  return now;
}

const WindowCounts& counts_in(const SubjectUsage& usage, Span span) {
  switch (span) {
    case Span::minute:
      return usage.minute;
    case Span::day:
      return usage.day;
    case Span::month:
      return usage.month;
  }
  return usage.month;
}

std::int64_t used(const WindowCounts& counts, Kind kind) {
  return kind == Kind::requests ? counts.requests : counts.tokens;
}

// The rule a budget's limit name stands for.
const LimitRule* rule_named(std::string_view label) {
  for (const LimitRule& rule : kRules) {
    if (label == rule.label) return &rule;
  }
  return nullptr;
}

const LimitRule* rule_for(Span span, Kind kind) {
  for (const LimitRule& rule : kRules) {
    if (rule.span == span && rule.kind == kind) return &rule;
  }
  return nullptr;
}

// One side of a quota subject: the user or the key.
struct Side {
  const SubjectUsage& usage;
  const Limits& limits;
  const char* who;  // "user" or "key"
};

RateLimitStatus compute_status(const Side& user, const Side& key, EpochMs now) {
  RateLimitStatus status;
  for (const Side* side : {&user, &key}) {
    for (const LimitRule& rule : kRules) {
      const std::optional<std::int64_t>& limit = side->limits.*rule.limit;
      if (!limit) continue;
      const std::int64_t remaining =
          std::max<std::int64_t>(0, *limit - used(counts_in(side->usage, rule.span), rule.kind));
      const std::int64_t reset_ms = window_end(rule.span, now) - now;
      auto& best = rule.kind == Kind::requests ? status.requests : status.tokens;
      // Ties go to the longer wait: that is when the tighter budget really frees up.
      if (!best || remaining < best->remaining || (remaining == best->remaining && reset_ms > best->reset_ms)) {
        best = RateLimitStatus::Dimension{*limit, remaining, reset_ms};
      }
    }
  }
  return status;
}

template <class W>
std::int64_t window_used(const W& window, Kind kind) {
  return kind == Kind::requests ? window.requests : window.tokens;
}

std::int64_t ceil_seconds(std::int64_t ms) { return std::max<std::int64_t>(1, (ms + kMsPerSecond - 1) / kMsPerSecond); }

}  // namespace

std::int64_t minute_index(EpochMs t) { return floor_div(t, kMsPerMinute); }

std::int64_t day_index(EpochMs t) { return floor_div(t, kMsPerDay); }

std::int64_t month_index(EpochMs t) {
  const CivilDate date = civil_from_days(day_index(t));
  return (date.year - 1970) * 12 + static_cast<std::int64_t>(date.month) - 1;
}

EpochMs next_minute_start(EpochMs t) { return (minute_index(t) + 1) * kMsPerMinute; }

EpochMs next_day_start(EpochMs t) { return (day_index(t) + 1) * kMsPerDay; }

EpochMs next_month_start(EpochMs t) {
  const CivilDate date = civil_from_days(day_index(t));
  const std::int64_t year = date.month == 12 ? date.year + 1 : date.year;
  const unsigned month = date.month == 12 ? 1 : date.month + 1;
  return days_from_civil(year, month, 1) * kMsPerDay;
}

std::string day_string(EpochMs t) {
  const CivilDate date = civil_from_days(day_index(t));
  if (date.year < 0 || date.year > 9999) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%04lld-%02u-%02u", static_cast<long long>(date.year), date.month, date.day);
    return buf;
  }
  // By hand: the metering writer formats one per usage row, and snprintf
  // costs more than the rest of the row's rollup.
  const auto y = static_cast<unsigned>(date.year);
  const char text[10] = {static_cast<char>('0' + y / 1000),
                         static_cast<char>('0' + y / 100 % 10),
                         static_cast<char>('0' + y / 10 % 10),
                         static_cast<char>('0' + y % 10),
                         '-',
                         static_cast<char>('0' + date.month / 10),
                         static_cast<char>('0' + date.month % 10),
                         '-',
                         static_cast<char>('0' + date.day / 10),
                         static_cast<char>('0' + date.day % 10)};
  return std::string(text, sizeof text);
}

std::optional<EpochMs> parse_utc_time(std::string_view text) {
  // The "Z" designator only follows a time of day.
  if ((text.size() == 17 || text.size() == 20) && text.back() == 'Z') text.remove_suffix(1);
  if (text.size() != 10 && text.size() != 16 && text.size() != 19) return std::nullopt;

  const auto year = read_digits(text, 0, 4);
  const auto month = read_digits(text, 5, 2);
  const auto day = read_digits(text, 8, 2);
  if (!year || !month || !day || text[4] != '-' || text[7] != '-') return std::nullopt;
  if (*month < 1 || *month > 12 || *day < 1 || *day > days_in_month(*year, *month)) {
    return std::nullopt;
  }

  unsigned hour = 0, minute = 0, second = 0;
  if (text.size() >= 16) {
    const auto h = read_digits(text, 11, 2);
    const auto m = read_digits(text, 14, 2);
    if (text[10] != 'T' || text[13] != ':' || !h || !m || *h > 23 || *m > 59) return std::nullopt;
    hour = *h;
    minute = *m;
  }
  if (text.size() == 19) {
    // Leap seconds (":60") are refused: epoch milliseconds cannot name them.
    const auto s = read_digits(text, 17, 2);
    if (text[16] != ':' || !s || *s > 59) return std::nullopt;
    second = *s;
  }
  return days_from_civil(*year, *month, *day) * kMsPerDay +
         static_cast<std::int64_t>(hour * 3600 + minute * 60 + second) * kMsPerSecond;
}

std::string format_reset(std::int64_t ms) {
  if (ms <= 0) return "0s";
  if (ms < kMsPerSecond) return std::to_string(ms) + "ms";
  const std::int64_t total = ceil_seconds(ms);
  const std::int64_t h = total / 3600, m = total % 3600 / 60, s = total % 60;
  std::string out;
  if (h > 0) out += std::to_string(h) + "h";
  if (h > 0 || m > 0) out += std::to_string(m) + "m";
  out += std::to_string(s) + "s";
  return out;
}

void QuotaLimiter::roll(Counters& c, EpochMs now) {
  const std::array<std::pair<Window*, std::int64_t>, 3> windows{{
      {&c.minute, minute_index(now)},
      {&c.day, day_index(now)},
      {&c.month, month_index(now)},
  }};
  for (auto [window, id] : windows) {
    if (window->id != id) *window = Window{id, 0, 0, {}, {}};
  }
}

SubjectUsage QuotaLimiter::current_usage(const Counters* c, EpochMs now) {
  SubjectUsage usage;
  if (!c) return usage;
  auto current = [](const Window& w, std::int64_t id) {
    return w.id == id ? WindowCounts{w.requests, w.tokens} : WindowCounts{};
  };
  usage.minute = current(c->minute, minute_index(now));
  usage.day = current(c->day, day_index(now));
  usage.month = current(c->month, month_index(now));
  return usage;
}

Admission QuotaLimiter::admit(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now) {
  std::lock_guard lock(mutex_);
  return admit_locked(subject, reserve_tokens, now);
}

Admission QuotaLimiter::admit_locked(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now) {
  reserve_tokens = std::max<std::int64_t>(0, reserve_tokens);
  Admission result;
  result.user_id = subject.user_id;
  result.key_id = subject.key_id;
  result.reserved_tokens = reserve_tokens;
  result.admitted_at = now;

  Counters& user = users_[subject.user_id];
  Counters& key = keys_[subject.key_id];
  roll(user, now);
  roll(key, now);
  struct SideState {
    Counters& counters;
    const Limits& limits;
    const char* who;
    std::string subject;
  };
  std::array<SideState, 2> sides{{
      {user, subject.user_limits, "user", shared_ ? "user:" + std::to_string(subject.user_id) : std::string()},
      {key, subject.key_limits, "key", shared_ ? "key:" + std::to_string(subject.key_id) : std::string()},
  }};
  const bool store_down = shared_ && store_down_locked(now);

  // Report the refusal the client can do least about: a request that can never
  // fit first, then the longest wait. Retry-After is the longest wait of all.
  bool refused = false, impossible = false, unreachable = false;
  std::int64_t longest_wait_ms = 0;
  for (std::size_t s = 0; s < sides.size(); ++s) {
    const SideState& side = sides[s];
    for (const LimitRule& rule : kRules) {
      const std::optional<std::int64_t>& limit = side.limits.*rule.limit;
      if (!limit) continue;
      const std::int64_t need = rule.kind == Kind::requests ? 1 : reserve_tokens;
      const bool never_fits = need > *limit;
      Window& window = window_of(side.counters, static_cast<unsigned>(rule.span));
      if (!never_fits) {
        if (!shared_) {
          if (window_used(window, rule.kind) + need <= *limit) continue;
        } else {
          Lease& lease = rule.kind == Kind::requests ? window.request_lease : window.token_lease;
          if (need <= lease.held) continue;
          const bool spent = lease.refused_at >= 0 && now - lease.refused_at < kSpentFor.count();
          if (!spent) {
            if (store_down) {
              if (sharing_.fail_open) continue;  // charged when the store is back
              unreachable = true;
              continue;
            }
            // Only the shortfall: what this replica holds of the budget counts.
            result.claims.push_back({side.subject, rule.label, window.id, window_end(rule.span, now), *limit,
                                     need - std::max<std::int64_t>(0, lease.held), window_used(window, rule.kind)});
            continue;
          }
        }
      }

      const std::int64_t wait_ms = window_end(rule.span, now) - now;
      const bool worse =
          !refused || (never_fits && !impossible) || (never_fits == impossible && wait_ms > longest_wait_ms);
      if (worse) {
        const std::string limit_text = std::string(rule.name) + " limit (" + std::to_string(*limit) + ")";
        result.reason = never_fits ? "request's max tokens (" + std::to_string(need) + ") exceed the " + limit_text +
                                         " for this " + side.who
                                   : limit_text + " reached for this " + side.who;
        result.limit = rule.label;
      }
      refused = true;
      impossible = impossible || never_fits;
      longest_wait_ms = std::max(longest_wait_ms, wait_ms);
    }
  }
  if (refused || unreachable) {
    result.claims.clear();
    if (!refused) {
      result.refusal_status = 503;
      result.reason =
          "the quota store is unreachable: requests under a limit are refused until it is back (" + down_error_ + ")";
      result.limit = "store_unavailable";
      longest_wait_ms = 1'000;
    }
    result.retry_after_s = ceil_seconds(longest_wait_ms);
    result.status = compute_status(Side{effective_usage(user, subject.user_limits, now), subject.user_limits, "user"},
                                   Side{effective_usage(key, subject.key_limits, now), subject.key_limits, "key"}, now);
    return result;
  }
  if (!result.claims.empty()) {
    result.pending = true;
    return result;
  }

  for (std::size_t s = 0; s < sides.size(); ++s) {
    Counters& c = sides[s].counters;
    for (Window* w : {&c.minute, &c.day, &c.month}) {
      w->requests += 1;
      w->tokens += reserve_tokens;
    }
    if (!shared_) continue;
    for (const LimitRule& rule : kRules) {
      if (!(sides[s].limits.*rule.limit)) continue;
      Window& window = window_of(c, static_cast<unsigned>(rule.span));
      Lease& lease = rule.kind == Kind::requests ? window.request_lease : window.token_lease;
      lease.held -= rule.kind == Kind::requests ? 1 : reserve_tokens;
      lease.last_use = now;
      if (rule.kind == Kind::tokens) result.leased_tokens |= 1u << (s * 3 + static_cast<unsigned>(rule.span));
    }
  }
  result.allowed = true;
  result.status = compute_status(Side{effective_usage(user, subject.user_limits, now), subject.user_limits, "user"},
                                 Side{effective_usage(key, subject.key_limits, now), subject.key_limits, "key"}, now);
  return result;
}

void QuotaLimiter::settle(const Admission& admission, std::int64_t actual_tokens, EpochMs now) {
  if (!admission.allowed) return;
  const std::int64_t delta = std::max<std::int64_t>(0, actual_tokens) - admission.reserved_tokens;
  if (delta == 0) return;
  // Windows are matched against the admission time, not the settle time.
  const std::array<std::int64_t, 3> ids{minute_index(admission.admitted_at), day_index(admission.admitted_at),
                                        month_index(admission.admitted_at)};

  std::lock_guard lock(mutex_);
  auto apply = [&](std::unordered_map<std::int64_t, Counters>& map, std::int64_t id, unsigned side) {
    const auto it = map.find(id);
    if (it == map.end()) return;
    Counters& c = it->second;
    const std::array<Window*, 3> windows{&c.minute, &c.day, &c.month};
    for (unsigned span = 0; span < 3; ++span) {
      Window& w = *windows[span];
      if (w.id != ids[span]) continue;
      w.tokens = std::max<std::int64_t>(0, w.tokens + delta);
      // Tokens not used stay in this replica's lease; tokens used past the
      // reservation come out of it, or are charged to the budget.
      if (admission.leased_tokens & (1u << (side * 3 + span))) {
        w.token_lease.held -= delta;
        w.token_lease.last_use = now;
      }
    }
  };
  apply(users_, admission.user_id, 0);
  apply(keys_, admission.key_id, 1);
}

RateLimitStatus QuotaLimiter::status(const QuotaSubject& subject, EpochMs now) {
  std::lock_guard lock(mutex_);
  auto usage = [&](std::unordered_map<std::int64_t, Counters>& map, std::int64_t id, const Limits& limits) {
    const auto it = map.find(id);
    return it == map.end() ? SubjectUsage{} : effective_usage(it->second, limits, now);
  };
  const SubjectUsage user = usage(users_, subject.user_id, subject.user_limits);
  const SubjectUsage key = usage(keys_, subject.key_id, subject.key_limits);
  return compute_status(Side{user, subject.user_limits, "user"}, Side{key, subject.key_limits, "key"}, now);
}

QuotaLimiter::Window& QuotaLimiter::window_of(Counters& c, unsigned span) {
  return span == 0 ? c.minute : span == 1 ? c.day : c.month;
}

// Locally the counts; with shared budgets, what the budget had left at this
// replica's last claim plus the lease it holds, as used = limit - that.
SubjectUsage QuotaLimiter::effective_usage(const Counters& c, const Limits& limits, EpochMs now) const {
  SubjectUsage usage = current_usage(&c, now);
  if (!shared_) return usage;
  const std::array<std::pair<const Window*, std::int64_t>, 3> windows{
      {{&c.minute, minute_index(now)}, {&c.day, day_index(now)}, {&c.month, month_index(now)}}};
  for (const LimitRule& rule : kRules) {
    const std::optional<std::int64_t>& limit = limits.*rule.limit;
    const auto [window, id] = windows[static_cast<unsigned>(rule.span)];
    if (!limit || window->id != id) continue;
    const Lease& lease = rule.kind == Kind::requests ? window->request_lease : window->token_lease;
    if (lease.pool_left < 0) continue;
    const std::int64_t left =
        std::clamp<std::int64_t>(lease.pool_left + std::max<std::int64_t>(0, lease.held), 0, *limit);
    WindowCounts& counts = rule.span == Span::minute ? usage.minute : rule.span == Span::day ? usage.day : usage.month;
    (rule.kind == Kind::requests ? counts.requests : counts.tokens) = *limit - left;
  }
  return usage;
}

QuotaLimiter::~QuotaLimiter() { stop_sharing(); }

void QuotaLimiter::share_budgets(std::unique_ptr<Store> store, BudgetSharing sharing) {
  std::lock_guard lock(mutex_);
  if (shared_) return;
  store_ = std::move(store);
  sharing_ = sharing;
  shared_ = true;
  thread_ = std::thread([this] { run_sharing(); });
}

void QuotaLimiter::stop_sharing() {
  std::lock_guard stop_lock(stop_mutex_);
  {
    std::lock_guard lock(mutex_);
    if (!shared_ || stop_) return;
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

QuotaLimiter::Lease* QuotaLimiter::lease_for(const BudgetClaim& claim, EpochMs now) {
  (void)now;
  const std::string_view subject = claim.subject;
  const bool user = subject.starts_with("user:");
  const std::string_view digits = subject.substr(user ? 5 : subject.starts_with("key:") ? 4 : subject.size());
  std::int64_t id = 0;
  if (digits.empty() || std::from_chars(digits.data(), digits.data() + digits.size(), id).ptr != digits.end()) {
    return nullptr;
  }
  const LimitRule* rule = rule_named(claim.limit_name);
  auto& map = user ? users_ : keys_;
  const auto it = map.find(id);
  if (!rule || it == map.end()) return nullptr;
  Window& window = window_of(it->second, static_cast<unsigned>(rule->span));
  if (window.id != claim.window) return nullptr;
  return rule->kind == Kind::requests ? &window.request_lease : &window.token_lease;
}

bool QuotaLimiter::store_down_locked(EpochMs now) const {
  return down_since_ >= 0 && now - last_failure_ < kStoreRetryMs;
}

void QuotaLimiter::mark_store_down(const std::string& error, EpochMs now) {
  if (down_since_ < 0) {
    down_since_ = now;
    std::fprintf(stderr, "quota: the budgets' store is unreachable, limited keys are %s: %s\n",
                 sharing_.fail_open ? "admitted past their leases" : "refused past their leases", error.c_str());
  }
  last_failure_ = now;
  down_error_ = error;
}

Admission QuotaLimiter::claim(const QuotaSubject& subject, std::int64_t reserve_tokens, EpochMs now) {
  // Twice at most: a refused claim gives back what this replica holds of that
  // budget (too little for this request, perhaps enough with the rest), and
  // the request claims once more, whole.
  for (int attempt = 0;; ++attempt) {
    std::vector<BudgetClaim> claims;
    {
      std::lock_guard lock(mutex_);
      Admission again = admit_locked(subject, reserve_tokens, now);
      if (!again.pending) return again;  // a lease claimed meanwhile covers it, or it is refused
      claims = std::move(again.claims);
    }
    BudgetOutcome outcome;
    std::vector<BudgetAdjustment> give_back;
    try {
      outcome = store_->claim_budgets(claims);
      std::lock_guard lock(mutex_);
      if (down_since_ >= 0) std::fprintf(stderr, "quota: the budgets' store answers again\n");
      down_since_ = -1;
      for (std::size_t i = 0; i < claims.size(); ++i) {
        Lease* lease = lease_for(claims[i], now);
        if (!lease) continue;  // its window ended meanwhile
        if (!outcome.refused) {
          lease->held += outcome.granted[i];
          lease->pool_left = outcome.remaining[i];
          lease->refused_at = -1;
        } else if (*outcome.refused == i) {  // the others were not read: what they have left is unknown
          lease->pool_left = outcome.remaining[i];
          if (lease->held > 0 && attempt == 0) {
            const BudgetClaim& c = claims[i];
            give_back.push_back({c.subject, c.limit_name, c.window, c.window_end, -lease->held});
            lease->held = 0;
          } else {
            lease->refused_at = now;
          }
        }
      }
      if (give_back.empty()) return admit_locked(subject, reserve_tokens, now);
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex_);
      mark_store_down(e.what(), now_ms());
      return admit_locked(subject, reserve_tokens, now);  // refused with a 503, or admitted failing open
    }
    try {
      store_->adjust_budgets(give_back);
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex_);
      mark_store_down(e.what(), now_ms());
      for (const auto& a : give_back) {
        const BudgetClaim as_claim{a.subject, a.limit_name, a.window, a.window_end, 0, 0, 0};
        if (Lease* lease = lease_for(as_claim, now)) lease->held -= a.delta;  // still this replica's
      }
      return admit_locked(subject, reserve_tokens, now);
    }
  }
}

BudgetStoreHealth QuotaLimiter::store_health() {
  std::lock_guard lock(mutex_);
  BudgetStoreHealth health;
  health.shared = shared_;
  health.reachable = down_since_ < 0;
  if (!health.reachable) {
    health.error = down_error_;
    health.unreachable_since = down_since_;
  }
  return health;
}

void QuotaLimiter::run_sharing() {
  EpochMs last_purge = 0;
  std::unique_lock lock(mutex_);
  while (!stop_) {
    wake_.wait_for(lock, kSharingTick, [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    const EpochMs now = now_ms();
    settle_leases(now, false);
    bool probe = false;
    {
      std::lock_guard probe_lock(mutex_);
      probe = down_since_ >= 0 && !store_down_locked(now);
    }
    if (probe || now - last_purge >= kPurgeEveryMs) {
      // Also how a store that failed is found back when no request needs it.
      try {
        store_->purge_budgets(now - kKeepEndedBudgetsMs);
        last_purge = now;
        std::lock_guard up_lock(mutex_);
        if (down_since_ >= 0) std::fprintf(stderr, "quota: the budgets' store answers again\n");
        down_since_ = -1;
      } catch (const std::exception& e) {
        std::lock_guard down_lock(mutex_);
        mark_store_down(e.what(), now);
      }
    }
    lock.lock();
  }
  lock.unlock();
  settle_leases(now_ms(), true);
}

// Gives back leases idle for sharing_.idle_return (every lease when
// `everything`) and charges use past them.
void QuotaLimiter::settle_leases(EpochMs now, bool everything) {
  std::vector<BudgetAdjustment> adjustments;
  {
    std::lock_guard lock(mutex_);
    if (!everything && store_down_locked(now)) return;
    for (auto* map : {&users_, &keys_}) {
      const std::string kind = map == &users_ ? "user:" : "key:";
      for (auto& [id, c] : *map) {
        roll(c, now);  // a lease of a window that ended is worth nothing now
        for (unsigned span = 0; span < 3; ++span) {
          Window& w = window_of(c, span);
          for (const Kind k : {Kind::requests, Kind::tokens}) {
            Lease& lease = k == Kind::requests ? w.request_lease : w.token_lease;
            const bool idle = everything || now - lease.last_use >= sharing_.idle_return.count();
            if (lease.held == 0 || (lease.held > 0 && !idle)) continue;
            const LimitRule* rule = rule_for(static_cast<Span>(span), k);
            if (!rule) continue;
            adjustments.push_back(
                {kind + std::to_string(id), rule->label, w.id, window_end(static_cast<Span>(span), now), lease.held});
            lease.held = 0;
          }
        }
      }
    }
  }
  if (adjustments.empty()) return;
  for (auto& a : adjustments) a.delta = -a.delta;  // held back is given back; held below zero is charged
  try {
    store_->adjust_budgets(adjustments);
  } catch (const std::exception& e) {
    std::lock_guard lock(mutex_);
    mark_store_down(e.what(), now);
    for (const auto& a : adjustments) {
      const BudgetClaim as_claim{a.subject, a.limit_name, a.window, a.window_end, 0, 0, 0};
      if (Lease* lease = lease_for(as_claim, now)) lease->held -= a.delta;  // still this replica's
    }
  }
}

void QuotaLimiter::restore(const Store::QuotaState& state, EpochMs now) {
  const std::int64_t minute = minute_index(now), day = day_index(now), month = month_index(now);
  auto counters = [&](const SubjectUsage& u) {
    Counters c;
    c.minute = Window{minute, u.minute.requests, u.minute.tokens, {}, {}};
    c.day = Window{day, u.day.requests, u.day.tokens, {}, {}};
    c.month = Window{month, u.month.requests, u.month.tokens, {}, {}};
    return c;
  };
  std::lock_guard lock(mutex_);
  users_.clear();
  keys_.clear();
  for (const auto& [id, usage] : state.users) users_[id] = counters(usage);
  for (const auto& [id, usage] : state.keys) keys_[id] = counters(usage);
}

}  // namespace tollgate::metering
