// Bounds on the strings clients and operators hand us: UTF-8-safe truncation
// and the one rule for what a user name may be.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace tollgate::metering {

// Longest stored model and backend names, and the longest user name.
constexpr std::size_t kMaxStoredName = 256;
constexpr std::size_t kMaxStoredRoute = 512;
constexpr std::size_t kMaxUserName = 128;

// Whether `s` is well-formed UTF-8 (no overlongs, no surrogates, at most U+10FFFF).
bool valid_utf8(std::string_view s);

// The longest prefix of `s` of at most `max_bytes` bytes that does not cut a
// UTF-8 sequence in two.
std::string_view truncate_utf8(std::string_view s, std::size_t max_bytes);

// `s` for a message: whole when it is short, else its first `max_bytes` and "…".
std::string excerpt(std::string_view s, std::size_t max_bytes = 64);

// `s` safe to print on a terminal: control characters (C0, DEL, C1) and
// bytes that are not UTF-8 become escapes (\n, \t, \x1b ...), a backslash
// becomes two. Reports show client-chosen strings (model names) through it.
std::string printable(std::string_view s);

// Why `name` cannot be a user name, or nullopt when it can: 1..kMaxUserName
// bytes of valid UTF-8, no control characters (C0, DEL, C1), no leading or
// trailing whitespace.
std::optional<std::string> user_name_problem(std::string_view name);

}  // namespace tollgate::metering
