#include "metering/quota.hpp"

#include <algorithm>
#include <array>
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
  const char text[10] = {static_cast<char>('0' + y / 1000),      static_cast<char>('0' + y / 100 % 10),
                         static_cast<char>('0' + y / 10 % 10),   static_cast<char>('0' + y % 10),
                         '-',
                         static_cast<char>('0' + date.month / 10), static_cast<char>('0' + date.month % 10),
                         '-',
                         static_cast<char>('0' + date.day / 10),   static_cast<char>('0' + date.day % 10)};
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
    if (window->id != id) *window = Window{id, 0, 0};
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
  reserve_tokens = std::max<std::int64_t>(0, reserve_tokens);
  Admission result;
  result.user_id = subject.user_id;
  result.key_id = subject.key_id;
  result.reserved_tokens = reserve_tokens;
  result.admitted_at = now;

  std::lock_guard lock(mutex_);
  Counters& user = users_[subject.user_id];
  Counters& key = keys_[subject.key_id];
  roll(user, now);
  roll(key, now);
  const SubjectUsage user_usage = current_usage(&user, now);
  const SubjectUsage key_usage = current_usage(&key, now);
  const Side user_side{user_usage, subject.user_limits, "user"};
  const Side key_side{key_usage, subject.key_limits, "key"};

  // Report the refusal the client can do least about: a request that can never
  // fit first, then the longest wait. Retry-After is the longest wait of all.
  bool refused = false, impossible = false;
  std::int64_t longest_wait_ms = 0;
  for (const Side* side : {&user_side, &key_side}) {
    for (const LimitRule& rule : kRules) {
      const std::optional<std::int64_t>& limit = side->limits.*rule.limit;
      if (!limit) continue;
      const std::int64_t need = rule.kind == Kind::requests ? 1 : reserve_tokens;
      if (used(counts_in(side->usage, rule.span), rule.kind) + need <= *limit) continue;

      const std::int64_t wait_ms = window_end(rule.span, now) - now;
      const bool never_fits = need > *limit;
      const bool worse =
          !refused || (never_fits && !impossible) || (never_fits == impossible && wait_ms > longest_wait_ms);
      if (worse) {
        const std::string limit_text = std::string(rule.name) + " limit (" + std::to_string(*limit) + ")";
        result.reason = never_fits ? "request's max tokens (" + std::to_string(need) + ") exceed the " + limit_text +
                                         " for this " + side->who
                                   : limit_text + " reached for this " + side->who;
        result.limit = rule.label;
      }
      refused = true;
      impossible = impossible || never_fits;
      longest_wait_ms = std::max(longest_wait_ms, wait_ms);
    }
  }
  if (refused) {
    result.retry_after_s = ceil_seconds(longest_wait_ms);
    result.status = compute_status(user_side, key_side, now);
    return result;
  }

  for (Counters* c : {&user, &key}) {
    for (Window* w : {&c->minute, &c->day, &c->month}) {
      w->requests += 1;
      w->tokens += reserve_tokens;
    }
  }
  result.allowed = true;
  const SubjectUsage user_after = current_usage(&user, now);
  const SubjectUsage key_after = current_usage(&key, now);
  result.status =
      compute_status(Side{user_after, subject.user_limits, "user"}, Side{key_after, subject.key_limits, "key"}, now);
  return result;
}

void QuotaLimiter::settle(const Admission& admission, std::int64_t actual_tokens, EpochMs now) {
  (void)now;  // windows are matched against the admission time, not the settle time
  if (!admission.allowed) return;
  const std::int64_t delta = std::max<std::int64_t>(0, actual_tokens) - admission.reserved_tokens;
  if (delta == 0) return;
  const std::int64_t minute = minute_index(admission.admitted_at);
  const std::int64_t day = day_index(admission.admitted_at);
  const std::int64_t month = month_index(admission.admitted_at);

  std::lock_guard lock(mutex_);
  auto apply = [&](std::unordered_map<std::int64_t, Counters>& map, std::int64_t id) {
    const auto it = map.find(id);
    if (it == map.end()) return;
    Counters& c = it->second;
    for (auto [w, window_id] : {std::pair{&c.minute, minute}, std::pair{&c.day, day}, std::pair{&c.month, month}}) {
      if (w->id == window_id) w->tokens = std::max<std::int64_t>(0, w->tokens + delta);
    }
  };
  apply(users_, admission.user_id);
  apply(keys_, admission.key_id);
}

RateLimitStatus QuotaLimiter::status(const QuotaSubject& subject, EpochMs now) {
  std::lock_guard lock(mutex_);
  auto find = [](const std::unordered_map<std::int64_t, Counters>& map, std::int64_t id) {
    const auto it = map.find(id);
    return it == map.end() ? nullptr : &it->second;
  };
  const SubjectUsage user = current_usage(find(users_, subject.user_id), now);
  const SubjectUsage key = current_usage(find(keys_, subject.key_id), now);
  return compute_status(Side{user, subject.user_limits, "user"}, Side{key, subject.key_limits, "key"}, now);
}

void QuotaLimiter::restore(const Store::QuotaState& state, EpochMs now) {
  const std::int64_t minute = minute_index(now), day = day_index(now), month = month_index(now);
  auto counters = [&](const SubjectUsage& u) {
    Counters c;
    c.minute = Window{minute, u.minute.requests, u.minute.tokens};
    c.day = Window{day, u.day.requests, u.day.tokens};
    c.month = Window{month, u.month.requests, u.month.tokens};
    return c;
  };
  std::lock_guard lock(mutex_);
  users_.clear();
  keys_.clear();
  for (const auto& [id, usage] : state.users) users_[id] = counters(usage);
  for (const auto& [id, usage] : state.keys) keys_[id] = counters(usage);
}

}  // namespace tollgate::metering
