// libpq helpers shared by the PostgreSQL store and the SQLite-to-PostgreSQL
// migration: parameters in text format, results that clear themselves, and the
// two rules for what reaches PostgreSQL and what reaches a message. Internal to
// metering/ (its .cpp files only; no header includes it).
#pragma once

#include <libpq-fe.h>

#include <charconv>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "metering/store.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::metering::pg {

// The URL without its password (user:PASSWORD@ or ?password=), for messages.
inline std::string redacted(std::string url) {
  if (const auto query = url.find('?'); query != std::string::npos) {
    if (const auto password = url.find("password=", query); password != std::string::npos) {
      const auto end = url.find('&', password);
      url = url.substr(0, password) + "password=***" + (end == std::string::npos ? "" : url.substr(end));
    }
  }
  const auto scheme = url.find("://");
  const auto at = url.rfind('@', url.find('?'));
  if (scheme == std::string::npos || at == std::string::npos || at < scheme) return url;
  const auto colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at) return url;
  return url.substr(0, colon) + ":***" + url.substr(at);
}

// PostgreSQL text holds neither NUL nor invalid UTF-8; SQLite takes both. Such
// text is stored with those bytes as '?', so one odd string cannot fail a batch.
inline std::string pg_text(std::string_view s) {
  std::string out(s);
  const bool valid = valid_utf8(s);
  for (char& c : out) {
    if (c == '\0' || (!valid && static_cast<unsigned char>(c) >= 0x80)) c = '?';
  }
  return out;
}

// Parameters in libpq's text format; nullopt is NULL.
class Params {
 public:
  Params& add(std::int64_t v) {
    values_.emplace_back(std::to_string(v));
    return *this;
  }
  Params& add(std::string_view v) {
    values_.emplace_back(pg_text(v));
    return *this;
  }
  Params& add(const std::string& v) { return add(std::string_view(v)); }
  Params& add(const char* v) { return add(std::string_view(v)); }
  Params& add(const std::optional<std::int64_t>& v) {
    if (v) return add(*v);
    values_.emplace_back(std::nullopt);
    return *this;
  }
  Params& add(const std::optional<std::string>& v) {
    if (v) return add(std::string_view(*v));
    values_.emplace_back(std::nullopt);
    return *this;
  }
  Params& add_limits(const Limits& limits) {
    return add(limits.requests_per_minute)
        .add(limits.tokens_per_minute)
        .add(limits.requests_per_day)
        .add(limits.tokens_per_day)
        .add(limits.tokens_per_month);
  }

  int size() const { return static_cast<int>(values_.size()); }
  std::vector<const char*> pointers() const {
    std::vector<const char*> out;
    out.reserve(values_.size());
    for (const auto& v : values_) out.push_back(v ? v->c_str() : nullptr);
    return out;
  }

 private:
  std::vector<std::optional<std::string>> values_;
};

// One statement's result, cleared when it goes.
class Result {
 public:
  explicit Result(PGresult* result) : result_(result) {}
  ~Result() { PQclear(result_); }
  Result(Result&& other) noexcept : result_(std::exchange(other.result_, nullptr)) {}
  Result& operator=(Result&&) = delete;
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;

  PGresult* get() const { return result_; }
  int rows() const { return PQntuples(result_); }
  bool null_at(int row, int column) const { return PQgetisnull(result_, row, column) != 0; }
  std::string text_at(int row, int column) const {
    return std::string(PQgetvalue(result_, row, column), static_cast<std::size_t>(PQgetlength(result_, row, column)));
  }
  // Integers, and SUM()s (numeric) of integers. NULL is 0.
  std::int64_t int64_at(int row, int column) const {
    if (null_at(row, column)) return 0;
    const char* text = PQgetvalue(result_, row, column);
    const char* end = text + PQgetlength(result_, row, column);
    std::int64_t value = 0;
    auto [ptr, ec] = std::from_chars(text, end, value);
    if (ec != std::errc() || ptr != end) {
      throw std::runtime_error("postgresql: expected an integer, got '" + excerpt(std::string_view(text, end - text)) +
                               "'");
    }
    return value;
  }
  std::optional<std::int64_t> optional_at(int row, int column) const {
    if (null_at(row, column)) return std::nullopt;
    return int64_at(row, column);
  }
  Limits limits_at(int row, int first) const {
    return {optional_at(row, first), optional_at(row, first + 1), optional_at(row, first + 2),
            optional_at(row, first + 3), optional_at(row, first + 4)};
  }
  // Rows an INSERT, UPDATE or DELETE touched.
  std::int64_t affected() const {
    const char* text = PQcmdTuples(result_);
    std::int64_t value = 0;
    std::from_chars(text, text + std::char_traits<char>::length(text), value);
    return value;
  }

 private:
  PGresult* result_;
};

}  // namespace tollgate::metering::pg
