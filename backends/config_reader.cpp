#include "backends/config_reader.hpp"

#include <yaml-cpp/yaml.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace tollgate::backends {

std::string child_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

void ConfigReader::fail(const std::string& path, const std::string& what) const {
  throw ConfigError(source_ + ": " + (path.empty() ? "" : path + ": ") + what);
}

void ConfigReader::expect_map(const YAML::Node& node, const std::string& path,
                              const std::set<std::string>& allowed) const {
  if (!node.IsMap()) fail(path, "expected a mapping");
  for (const auto& entry : node) {
    // A complex key ("? {a: b}") would throw yaml-cpp's own error, naming no file.
    if (!entry.first.IsScalar()) fail(path, "expected plain keys");
    auto key = entry.first.as<std::string>();
    if (!allowed.contains(key)) {
      std::string known;
      for (const auto& k : allowed) known += (known.empty() ? "" : ", ") + k;
      fail(path, "unknown key '" + key + "' (known keys: " + known + ")");
    }
  }
}

std::string ConfigReader::scalar(const YAML::Node& node, const std::string& path) const {
  if (!node.IsScalar()) fail(path, "expected a single value");
  return interpolate_env(node.Scalar(), source_ + ": " + path);
}

std::string ConfigReader::string(const YAML::Node& node, const std::string& path) const {
  auto s = scalar(node, path);
  if (s.empty()) fail(path, "must not be empty");
  return s;
}

std::int64_t ConfigReader::integer(const YAML::Node& node, const std::string& path, std::int64_t min,
                                   std::int64_t max) const {
  auto s = scalar(node, path);
  std::int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) fail(path, "expected an integer, got '" + s + "'");
  if (v < min || v > max) fail(path, "must be between " + std::to_string(min) + " and " + std::to_string(max));
  return v;
}

bool ConfigReader::boolean(const YAML::Node& node, const std::string& path) const {
  auto s = scalar(node, path);
  if (s == "true" || s == "yes" || s == "on") return true;
  if (s == "false" || s == "no" || s == "off") return false;
  fail(path, "expected true or false, got '" + s + "'");
}

std::chrono::milliseconds ConfigReader::duration(const YAML::Node& node, const std::string& path) const {
  auto s = scalar(node, path);
  auto d = parse_duration(s);
  if (!d) fail(path, "expected a duration such as 500ms, 10s or 2m, got '" + s + "'");
  return *d;
}

std::size_t ConfigReader::size(const YAML::Node& node, const std::string& path) const {
  auto s = scalar(node, path);
  auto v = parse_size(s);
  if (!v) fail(path, "expected a size such as 4MiB or 16KiB, got '" + s + "'");
  return *v;
}

std::string interpolate_env(const std::string& text, const std::string& where) {
  std::string out;
  std::size_t i = 0;
  while (i < text.size()) {
    auto open = text.find("${", i);
    if (open == std::string::npos) {
      out.append(text, i);
      break;
    }
    out.append(text, i, open - i);
    auto close = text.find('}', open);
    if (close == std::string::npos) throw ConfigError(where + ": unterminated ${ in '" + text + "'");
    std::string inner = text.substr(open + 2, close - open - 2);
    std::optional<std::string> fallback;
    if (auto sep = inner.find(":-"); sep != std::string::npos) {
      fallback = inner.substr(sep + 2);
      inner.resize(sep);
    }
    if (inner.empty()) throw ConfigError(where + ": empty variable name in '" + text + "'");
    const char* value = std::getenv(inner.c_str());
    if (value && *value) {
      out += value;
    } else if (fallback) {
      out += *fallback;
    } else {
      throw ConfigError(where + ": environment variable " + inner + " is not set");
    }
    i = close + 1;
  }
  return out;
}

std::optional<std::chrono::milliseconds> parse_duration(const std::string& text) {
  double value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  // from_chars accepts "inf" and "nan": neither is a duration.
  if (ec != std::errc() || !std::isfinite(value) || value < 0) return std::nullopt;
  std::string unit(end, text.data() + text.size());
  double ms = 0;
  if (unit == "ms")
    ms = value;
  else if (unit == "s")
    ms = value * 1000;
  else if (unit == "m")
    ms = value * 60'000;
  else if (unit == "h")
    ms = value * 3'600'000;
  else
    return std::nullopt;
  // Capped at ~30 years, well before nanosecond timers overflow (~292 years).
  if (ms > 1e12) return std::nullopt;
  return std::chrono::milliseconds(static_cast<std::int64_t>(ms));
}

std::optional<std::size_t> parse_size(const std::string& text) {
  std::uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc()) return std::nullopt;
  std::string unit(end, text.data() + text.size());
  std::uint64_t mult = 0;
  if (unit.empty() || unit == "B")
    mult = 1;
  else if (unit == "KiB")
    mult = 1024;
  else if (unit == "MiB")
    mult = 1024 * 1024;
  else if (unit == "GiB")
    mult = 1024ull * 1024 * 1024;
  else if (unit == "KB" || unit == "kB")
    mult = 1000;
  else if (unit == "MB")
    mult = 1000 * 1000;
  else if (unit == "GB")
    mult = 1000ull * 1000 * 1000;
  else
    return std::nullopt;
  if (value > std::numeric_limits<std::size_t>::max() / mult) return std::nullopt;  // would wrap around
  return static_cast<std::size_t>(value * mult);
}

}  // namespace tollgate::backends
