#include "gateway/config.hpp"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace tollgate::gateway {
namespace {

// Where a node sits, for messages: "models[1].deployments[0].backend".
std::string child_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw ConfigError(source_ + ": " + (path.empty() ? "" : path + ": ") + what);
  }

  void expect_map(const YAML::Node& node, const std::string& path, const std::set<std::string>& allowed) const {
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

  std::string scalar(const YAML::Node& node, const std::string& path) const {
    if (!node.IsScalar()) fail(path, "expected a single value");
    return interpolate_env(node.Scalar(), source_ + ": " + path);
  }

  std::string string(const YAML::Node& node, const std::string& path) const {
    auto s = scalar(node, path);
    if (s.empty()) fail(path, "must not be empty");
    return s;
  }

  std::int64_t integer(const YAML::Node& node, const std::string& path, std::int64_t min, std::int64_t max) const {
    auto s = scalar(node, path);
    std::int64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || end != s.data() + s.size()) fail(path, "expected an integer, got '" + s + "'");
    if (v < min || v > max) {
      fail(path, "must be between " + std::to_string(min) + " and " + std::to_string(max));
    }
    return v;
  }

  bool boolean(const YAML::Node& node, const std::string& path) const {
    auto s = scalar(node, path);
    if (s == "true" || s == "yes" || s == "on") return true;
    if (s == "false" || s == "no" || s == "off") return false;
    fail(path, "expected true or false, got '" + s + "'");
  }

  std::chrono::milliseconds duration(const YAML::Node& node, const std::string& path) const {
    auto s = scalar(node, path);
    auto d = parse_duration(s);
    if (!d) fail(path, "expected a duration such as 500ms, 10s or 2m, got '" + s + "'");
    return *d;
  }

  std::size_t size(const YAML::Node& node, const std::string& path) const {
    auto s = scalar(node, path);
    auto v = parse_size(s);
    if (!v) fail(path, "expected a size such as 4MiB or 16KiB, got '" + s + "'");
    return *v;
  }

 private:
  std::string source_;
};

ServerLimits read_limits(const Reader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path,
               {"max_body", "max_header", "header_timeout", "body_timeout", "idle_timeout", "shutdown_grace",
                "max_connections"});
  ServerLimits limits;
  if (auto n = node["max_body"]) limits.max_body = r.size(n, child_path(path, "max_body"));
  if (auto n = node["max_header"]) limits.max_header = r.size(n, child_path(path, "max_header"));
  if (auto n = node["header_timeout"]) limits.header_timeout = r.duration(n, child_path(path, "header_timeout"));
  if (auto n = node["body_timeout"]) limits.body_timeout = r.duration(n, child_path(path, "body_timeout"));
  if (auto n = node["idle_timeout"]) limits.idle_timeout = r.duration(n, child_path(path, "idle_timeout"));
  if (auto n = node["shutdown_grace"]) limits.shutdown_grace = r.duration(n, child_path(path, "shutdown_grace"));
  if (auto n = node["max_connections"]) {
    limits.max_connections = static_cast<std::size_t>(r.integer(n, child_path(path, "max_connections"), 1, 1'000'000));
  }
  if (limits.max_header < 1024) r.fail(child_path(path, "max_header"), "must be at least 1KiB");
  return limits;
}

MeteringConfig read_metering(const Reader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path, {"flush_interval", "per_user_metrics", "default_reserve_tokens"});
  MeteringConfig m;
  if (auto n = node["flush_interval"]) m.flush_interval = r.duration(n, child_path(path, "flush_interval"));
  if (auto n = node["per_user_metrics"]) m.per_user_metrics = r.boolean(n, child_path(path, "per_user_metrics"));
  if (auto n = node["default_reserve_tokens"]) {
    m.default_reserve_tokens = r.integer(n, child_path(path, "default_reserve_tokens"), 0, 10'000'000);
  }
  if (m.flush_interval.count() <= 0) r.fail(child_path(path, "flush_interval"), "must be positive");
  return m;
}

BackendConfig read_backend(const Reader& r, const YAML::Node& node, const std::string& path) {
  if (!node.IsMap()) r.fail(path, "expected a mapping");
  if (!node["type"]) r.fail(path, "missing key 'type'");
  BackendConfig b;
  b.type = r.string(node["type"], child_path(path, "type"));
  if (b.type == "echo") {
    r.expect_map(node, path, {"name", "type", "token_delay"});
    if (auto n = node["token_delay"]) b.token_delay = r.duration(n, child_path(path, "token_delay"));
  } else if (b.type == "openai") {
    r.expect_map(node, path,
                 {"name", "type", "base_url", "api_key", "headers", "timeouts", "max_connections", "ca_file",
                  "insecure_skip_verify", "tokenizer"});
    if (auto n = node["tokenizer"]) b.tokenizer = r.string(n, child_path(path, "tokenizer"));
    if (!node["base_url"]) r.fail(path, "missing key 'base_url'");
    b.base_url = r.string(node["base_url"], child_path(path, "base_url"));
    if (!b.base_url.starts_with("http://") && !b.base_url.starts_with("https://")) {
      r.fail(child_path(path, "base_url"), "must start with http:// or https://");
    }
    // May be empty: a local vLLM or llama.cpp server often wants no key.
    if (auto n = node["api_key"]) b.api_key = r.scalar(n, child_path(path, "api_key"));
    if (auto n = node["headers"]) {
      auto hpath = child_path(path, "headers");
      if (!n.IsMap()) r.fail(hpath, "expected a mapping of header names to values");
      for (const auto& h : n) {
        auto name = h.first.as<std::string>();
        b.headers.emplace_back(name, r.scalar(h.second, child_path(hpath, name)));
      }
    }
    if (auto n = node["timeouts"]) {
      auto tpath = child_path(path, "timeouts");
      r.expect_map(n, tpath, {"connect", "first_byte", "idle", "total"});
      std::pair<const char*, std::chrono::milliseconds*> timeouts[] = {{"connect", &b.connect_timeout},
                                                                       {"first_byte", &b.first_byte_timeout},
                                                                       {"idle", &b.idle_timeout},
                                                                       {"total", &b.total_timeout}};
      for (auto [key, target] : timeouts) {
        if (!n[key]) continue;
        *target = r.duration(n[key], child_path(tpath, key));
        if (target->count() <= 0) r.fail(child_path(tpath, key), "must be positive");
      }
    }
    if (auto n = node["max_connections"]) {
      b.max_connections = static_cast<std::size_t>(r.integer(n, child_path(path, "max_connections"), 1, 100'000));
    }
    if (auto n = node["ca_file"]) b.ca_file = r.string(n, child_path(path, "ca_file"));
    if (auto n = node["insecure_skip_verify"]) {
      b.insecure_skip_verify = r.boolean(n, child_path(path, "insecure_skip_verify"));
    }
  } else if (b.type == "local") {
    r.expect_map(
        node, path,
        {"name", "type", "path", "tokenizer", "create_demo", "device", "max_num_seqs", "max_num_batched_tokens",
         "max_model_len", "kv_cache", "block_size", "max_waiting", "threads", "prefix_caching"});
    if (!node["path"]) r.fail(path, "missing key 'path' (the model file)");
    b.path = r.string(node["path"], child_path(path, "path"));
    if (auto n = node["tokenizer"]) b.tokenizer = r.string(n, child_path(path, "tokenizer"));
    if (auto n = node["create_demo"]) b.create_demo = r.boolean(n, child_path(path, "create_demo"));
    if (auto n = node["prefix_caching"]) b.prefix_caching = r.boolean(n, child_path(path, "prefix_caching"));
    if (auto n = node["device"]) {
      b.device = r.string(n, child_path(path, "device"));
      if (b.device != "auto" && b.device != "cpu" && b.device != "cuda") {
        r.fail(child_path(path, "device"), "expected auto, cpu or cuda, got '" + b.device + "'");
      }
    }
    std::pair<const char*, std::int64_t*> counts[] = {{"max_num_seqs", &b.max_num_seqs},
                                                      {"max_num_batched_tokens", &b.max_num_batched_tokens},
                                                      {"block_size", &b.block_size},
                                                      {"max_waiting", &b.max_waiting}};
    for (auto [key, target] : counts) {
      if (auto n = node[key]) *target = r.integer(n, child_path(path, key), 1, 1'000'000);
    }
    // 0, the default, means the model file's own context length.
    if (auto n = node["max_model_len"]) b.max_model_len = r.integer(n, child_path(path, "max_model_len"), 0, 1'000'000);
    if (auto n = node["kv_cache"])
      b.kv_cache_bytes = static_cast<std::int64_t>(r.size(n, child_path(path, "kv_cache")));
    if (auto n = node["threads"]) b.threads = static_cast<int>(r.integer(n, child_path(path, "threads"), 0, 1024));
  } else {
    r.fail(child_path(path, "type"), "unknown backend type '" + b.type + "' (known types: echo, openai, local)");
  }
  if (!node["name"]) r.fail(path, "missing key 'name'");
  b.name = r.string(node["name"], child_path(path, "name"));
  return b;
}

ModelConfig read_model(const Reader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path, {"name", "deployments", "strategy"});
  if (!node["name"]) r.fail(path, "missing key 'name'");
  ModelConfig m;
  m.name = r.string(node["name"], child_path(path, "name"));
  if (auto n = node["strategy"]) {
    auto strategy = r.string(n, child_path(path, "strategy"));
    if (strategy != "weighted" && strategy != "least_busy") {
      r.fail(child_path(path, "strategy"), "expected weighted or least_busy, got '" + strategy + "'");
    }
    m.least_busy = strategy == "least_busy";
  }
  auto deployments = node["deployments"];
  if (!deployments || !deployments.IsSequence() || deployments.size() == 0) {
    r.fail(child_path(path, "deployments"), "expected a non-empty list");
  }
  for (std::size_t i = 0; i < deployments.size(); ++i) {
    auto dpath = child_path(path, "deployments") + "[" + std::to_string(i) + "]";
    const auto& d = deployments[i];
    r.expect_map(d, dpath, {"backend", "model", "weight"});
    if (!d["backend"]) r.fail(dpath, "missing key 'backend'");
    DeploymentConfig dep;
    dep.backend = r.string(d["backend"], child_path(dpath, "backend"));
    dep.model = d["model"] ? r.string(d["model"], child_path(dpath, "model")) : m.name;
    if (auto n = d["weight"])
      dep.weight = static_cast<std::uint32_t>(r.integer(n, child_path(dpath, "weight"), 1, 1'000'000));
    m.deployments.push_back(std::move(dep));
  }
  return m;
}

void check_references(const Reader& r, const Config& c) {
  std::set<std::string> backends;
  for (const auto& b : c.backends) {
    if (!backends.insert(b.name).second) r.fail("backends", "backend '" + b.name + "' is defined twice");
  }
  std::set<std::string> models;
  for (const auto& m : c.models) {
    if (!models.insert(m.name).second) r.fail("models", "model '" + m.name + "' is defined twice");
    for (const auto& d : m.deployments) {
      if (!backends.contains(d.backend)) {
        r.fail("models", "model '" + m.name + "' names unknown backend '" + d.backend + "'");
      }
    }
  }
}

// "http://HOST[:PORT][/]": the app is reached over plain HTTP on a trusted network.
AppUpstreamConfig read_app_upstream(const Reader& r, const YAML::Node& node, const std::string& path) {
  AppUpstreamConfig a;
  a.url = r.string(node, path);
  constexpr std::string_view kScheme = "http://";
  std::string_view rest = a.url;
  if (!rest.starts_with(kScheme)) r.fail(path, "expected http://HOST:PORT, got '" + a.url + "'");
  rest.remove_prefix(kScheme.size());
  if (rest.ends_with('/')) rest.remove_suffix(1);
  if (rest.find('/') != std::string_view::npos) r.fail(path, "a path prefix is not supported, got '" + a.url + "'");
  std::string authority(rest);
  if (authority.find(':') == std::string::npos || authority.back() == ']') authority += ":80";
  auto hp = parse_listen(authority);
  if (!hp || authority.front() == ':' || hp->port == 0) r.fail(path, "expected http://HOST:PORT, got '" + a.url + "'");
  a.host = hp->host;
  a.port = hp->port;
  return a;
}

void read_app_timeouts(const Reader& r, const YAML::Node& node, const std::string& path, AppUpstreamConfig& a) {
  r.expect_map(node, path, {"connect", "first_byte", "idle"});
  if (auto n = node["connect"]) a.connect_timeout = r.duration(n, child_path(path, "connect"));
  if (auto n = node["first_byte"]) a.first_byte_timeout = r.duration(n, child_path(path, "first_byte"));
  if (auto n = node["idle"]) a.idle_timeout = r.duration(n, child_path(path, "idle"));
  for (auto t : {a.connect_timeout, a.first_byte_timeout, a.idle_timeout}) {
    if (t.count() <= 0) r.fail(path, "timeouts must be positive");
  }
}

std::vector<std::string> read_string_list(const Reader& r, const YAML::Node& node, const std::string& path) {
  if (!node.IsSequence()) r.fail(path, "expected a list");
  std::vector<std::string> out;
  for (std::size_t i = 0; i < node.size(); ++i) out.push_back(r.string(node[i], path + "[" + std::to_string(i) + "]"));
  return out;
}

}  // namespace

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

std::optional<ListenAddress> parse_listen(const std::string& text) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  ListenAddress a;
  a.host = text.substr(0, colon);
  if (a.host.size() >= 2 && a.host.front() == '[' && a.host.back() == ']') a.host = a.host.substr(1, a.host.size() - 2);
  if (a.host.empty()) a.host = "0.0.0.0";
  auto port = text.substr(colon + 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || value > 65535) return std::nullopt;
  a.port = static_cast<std::uint16_t>(value);
  return a;
}

Config parse_config(const std::string& yaml_text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(source + ": invalid YAML: " + e.what());
  }
  Reader r(source);
  Config c;
  if (root.IsNull()) return c;
  r.expect_map(root, "",
               {"listen", "database", "io_threads", "limits", "metering", "backends", "models", "routing",
                "app_upstream", "app_timeouts", "public_paths", "trusted_proxies"});
  if (auto n = root["listen"]) {
    auto s = r.scalar(n, "listen");
    auto a = parse_listen(s);
    if (!a) r.fail("listen", "expected HOST:PORT, got '" + s + "'");
    c.listen = *a;
  }
  if (auto n = root["database"]) c.database = r.string(n, "database");
  if (auto n = root["io_threads"]) c.io_threads = static_cast<int>(r.integer(n, "io_threads", 0, 256));
  if (auto n = root["limits"]) c.limits = read_limits(r, n, "limits");
  if (auto n = root["metering"]) c.metering = read_metering(r, n, "metering");
  if (auto n = root["backends"]) {
    if (!n.IsSequence()) r.fail("backends", "expected a list");
    for (std::size_t i = 0; i < n.size(); ++i) {
      c.backends.push_back(read_backend(r, n[i], "backends[" + std::to_string(i) + "]"));
    }
  }
  if (auto n = root["routing"]) {
    r.expect_map(n, "routing", {"cooldown_failures", "cooldown"});
    if (auto f = n["cooldown_failures"]) {
      c.routing.cooldown_failures = static_cast<int>(r.integer(f, "routing.cooldown_failures", 1, 1'000'000));
    }
    if (auto d = n["cooldown"]) c.routing.cooldown = r.duration(d, "routing.cooldown");
  }
  if (auto n = root["models"]) {
    if (!n.IsSequence()) r.fail("models", "expected a list");
    for (std::size_t i = 0; i < n.size(); ++i) {
      c.models.push_back(read_model(r, n[i], "models[" + std::to_string(i) + "]"));
    }
  }
  if (auto n = root["app_upstream"]) c.app_upstream = read_app_upstream(r, n, "app_upstream");
  if (auto n = root["app_timeouts"]) {
    if (!c.app_upstream) r.fail("app_timeouts", "needs app_upstream");
    read_app_timeouts(r, n, "app_timeouts", *c.app_upstream);
  }
  if (auto n = root["public_paths"]) {
    c.public_paths = read_string_list(r, n, "public_paths");
    for (std::size_t i = 0; i < c.public_paths.size(); ++i) {
      const auto& p = c.public_paths[i];
      auto where = "public_paths[" + std::to_string(i) + "]";
      if (p.front() != '/') r.fail(where, "must start with '/', got '" + p + "'");
      if (p.find('*') != std::string::npos && p.find('*') != p.size() - 1) {
        r.fail(where, "'*' is only allowed at the end, got '" + p + "'");
      }
    }
  }
  if (auto n = root["trusted_proxies"]) {
    c.trusted_proxies = read_string_list(r, n, "trusted_proxies");
    for (std::size_t i = 0; i < c.trusted_proxies.size(); ++i) {
      unsigned char addr[16];
      const auto& a = c.trusted_proxies[i];
      if (inet_pton(AF_INET, a.c_str(), addr) != 1 && inet_pton(AF_INET6, a.c_str(), addr) != 1) {
        r.fail("trusted_proxies[" + std::to_string(i) + "]", "expected an IP address, got '" + a + "'");
      }
    }
  }
  check_references(r, c);
  return c;
}

Config load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open the file");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path);
}

const std::string& embedded_default_yaml() {
  static const std::string yaml = R"(# Tollgate's embedded default: what `tollgate serve` runs without --config.
listen: 127.0.0.1:8080
database: ./tollgate.db
metering: {flush_interval: 1s, per_user_metrics: false}
limits: {max_body: 4MiB, header_timeout: 10s, idle_timeout: 60s, max_connections: 10000}
backends:
  - {name: echo, type: echo}
  # A random-weight demo model Tollgate writes itself at first start (it
  # babbles: configure a real GGUF to serve a real model).
  - {name: local, type: local, path: ./tollgate-demo.gguf, create_demo: true, max_num_seqs: 8}
models:
  - name: echo
    deployments: [{backend: echo}]
  - name: demo
    deployments: [{backend: local}]
)";
  return yaml;
}

Config embedded_default_config() { return parse_config(embedded_default_yaml(), "embedded default"); }

}  // namespace tollgate::gateway
