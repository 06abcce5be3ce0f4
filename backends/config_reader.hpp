// Reading YAML configuration values with errors that name the file and the key
// path ("gw.yaml: backends[1].base_url: ..."): the gateway's config and each
// backend type's own section read through it. Callers include yaml-cpp.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

namespace YAML {
class Node;
}

namespace tollgate::backends {

// A configuration the gateway refuses to start with.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Where a node sits, for messages: "models[1].deployments[0].backend".
std::string child_path(const std::string& parent, const std::string& key);

// Reads the values of one source (a file, the embedded default); every value is
// ${ENV}-interpolated, every error is a ConfigError naming the source and path.
class ConfigReader {
 public:
  explicit ConfigReader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& what) const;
  // A mapping with plain keys, each in `allowed` (the message lists them).
  void expect_map(const YAML::Node& node, const std::string& path, const std::set<std::string>& allowed) const;
  std::string scalar(const YAML::Node& node, const std::string& path) const;  // may be empty
  std::string string(const YAML::Node& node, const std::string& path) const;  // must not be empty
  std::int64_t integer(const YAML::Node& node, const std::string& path, std::int64_t min, std::int64_t max) const;
  bool boolean(const YAML::Node& node, const std::string& path) const;
  std::chrono::milliseconds duration(const YAML::Node& node, const std::string& path) const;
  std::size_t size(const YAML::Node& node, const std::string& path) const;

 private:
  std::string source_;
};

// Replaces ${NAME} and ${NAME:-fallback} with the environment's values;
// ConfigError for an unset NAME without fallback.
std::string interpolate_env(const std::string& text, const std::string& where);

// "250ms", "10s", "2m", "1h" -> milliseconds.
std::optional<std::chrono::milliseconds> parse_duration(const std::string& text);
// "4MiB", "512KiB", "1MB", "1048576" -> bytes.
std::optional<std::size_t> parse_size(const std::string& text);

}  // namespace tollgate::backends
