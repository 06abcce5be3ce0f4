#include "gateway/config.hpp"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <fstream>
#include <set>
#include <sstream>

namespace tollgate::gateway {
namespace {

using backends::child_path;
using backends::ConfigReader;

ServerLimits read_limits(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
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

MeteringConfig read_metering(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path,
               {"flush_interval", "per_user_metrics", "default_reserve_tokens", "lease_idle_return", "quota_fail_open",
                "key_refresh_interval", "max_queued_rows", "spill_file"});
  MeteringConfig m;
  if (auto n = node["flush_interval"]) m.flush_interval = r.duration(n, child_path(path, "flush_interval"));
  if (auto n = node["per_user_metrics"]) m.per_user_metrics = r.boolean(n, child_path(path, "per_user_metrics"));
  if (auto n = node["default_reserve_tokens"]) {
    m.default_reserve_tokens = r.integer(n, child_path(path, "default_reserve_tokens"), 0, 10'000'000);
  }
  if (auto n = node["lease_idle_return"]) m.lease_idle_return = r.duration(n, child_path(path, "lease_idle_return"));
  if (auto n = node["quota_fail_open"]) m.quota_fail_open = r.boolean(n, child_path(path, "quota_fail_open"));
  if (auto n = node["max_queued_rows"]) {
    m.max_queued_rows = static_cast<std::size_t>(r.integer(n, child_path(path, "max_queued_rows"), 1, 100'000'000));
  }
  if (auto n = node["spill_file"]) m.spill_file = r.string(n, child_path(path, "spill_file"));
  if (auto n = node["key_refresh_interval"]) {
    m.key_refresh_interval = r.duration(n, child_path(path, "key_refresh_interval"));
    if (m.key_refresh_interval.count() <= 0) r.fail(child_path(path, "key_refresh_interval"), "must be positive");
  }
  if (m.flush_interval.count() <= 0) r.fail(child_path(path, "flush_interval"), "must be positive");
  if (m.lease_idle_return.count() <= 0) r.fail(child_path(path, "lease_idle_return"), "must be positive");
  return m;
}

// The type named in the section reads the rest of it.
BackendConfig read_backend(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  if (!node.IsMap()) r.fail(path, "expected a mapping");
  if (!node["type"]) r.fail(path, "missing key 'type'");
  BackendConfig b;
  b.type = r.string(node["type"], child_path(path, "type"));
  const auto& types = backends::builtin_backend_types();
  const auto* type = types.find(b.type);
  if (!type) {
    r.fail(child_path(path, "type"), "unknown backend type '" + b.type + "' (known types: " + types.names() + ")");
  }
  if (!node["name"]) r.fail(path, "missing key 'name'");
  b.name = r.string(node["name"], child_path(path, "name"));
  b.spec = type->parse(r, node, path, b.name);
  return b;
}

ModelConfig read_model(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
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

void check_references(const ConfigReader& r, const Config& c) {
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
  for (const auto& e : c.jobs.endpoints) {
    if (!models.contains(e.model))
      r.fail("jobs.endpoints", "endpoint '" + e.name + "' names unknown model '" + e.model + "'");
  }
}

// "http://HOST[:PORT][/]": the app is reached over plain HTTP on a trusted network.
AppUpstreamConfig read_app_upstream(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
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

void read_app_timeouts(const ConfigReader& r, const YAML::Node& node, const std::string& path, AppUpstreamConfig& a) {
  r.expect_map(node, path, {"connect", "first_byte", "idle"});
  if (auto n = node["connect"]) a.connect_timeout = r.duration(n, child_path(path, "connect"));
  if (auto n = node["first_byte"]) a.first_byte_timeout = r.duration(n, child_path(path, "first_byte"));
  if (auto n = node["idle"]) a.idle_timeout = r.duration(n, child_path(path, "idle"));
  for (auto t : {a.connect_timeout, a.first_byte_timeout, a.idle_timeout}) {
    if (t.count() <= 0) r.fail(path, "timeouts must be positive");
  }
}

std::vector<std::string> read_string_list(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  if (!node.IsSequence()) r.fail(path, "expected a list");
  std::vector<std::string> out;
  for (std::size_t i = 0; i < node.size(); ++i) out.push_back(r.string(node[i], path + "[" + std::to_string(i) + "]"));
  return out;
}

bool valid_endpoint_name(const std::string& name) {
  return !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_';
  });
}

JobEndpointConfig read_job_endpoint(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(
      node, path,
      {"name", "model", "max_concurrency", "max_queue", "execution_timeout", "result_ttl", "on_interrupt", "defaults"});
  JobEndpointConfig e;
  for (const char* key : {"name", "model"}) {
    if (!node[key]) r.fail(path, std::string("missing key '") + key + "'");
  }
  e.name = r.string(node["name"], child_path(path, "name"));
  if (!valid_endpoint_name(e.name)) r.fail(child_path(path, "name"), "use 1 to 64 of A-Z a-z 0-9 - _");
  e.model = r.string(node["model"], child_path(path, "model"));
  if (auto n = node["max_concurrency"]) {
    e.max_concurrency = static_cast<std::size_t>(r.integer(n, child_path(path, "max_concurrency"), 1, 10'000));
  }
  if (auto n = node["max_queue"]) {
    e.max_queue = static_cast<std::size_t>(r.integer(n, child_path(path, "max_queue"), 1, 10'000'000));
  }
  if (auto n = node["execution_timeout"]) e.execution_timeout = r.duration(n, child_path(path, "execution_timeout"));
  if (auto n = node["result_ttl"]) e.result_ttl = r.duration(n, child_path(path, "result_ttl"));
  if (e.execution_timeout.count() <= 0 || e.result_ttl.count() <= 0) r.fail(path, "durations must be positive");
  if (auto n = node["on_interrupt"]) {
    auto v = r.string(n, child_path(path, "on_interrupt"));
    if (v != "fail" && v != "requeue") r.fail(child_path(path, "on_interrupt"), "expected fail or requeue");
    e.requeue_interrupted = v == "requeue";
  }
  if (auto n = node["defaults"]) {
    auto where = child_path(path, "defaults");
    r.expect_map(n, where,
                 {"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty"});
    for (const auto& kv : n) {
      auto key = kv.first.as<std::string>();
      e.defaults.emplace_back(key, r.string(kv.second, child_path(where, key)));
    }
  }
  return e;
}

WebhookConfig read_webhook(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path, {"secret", "timeout", "max_attempts", "first_backoff", "allow_private", "allow_hosts"});
  WebhookConfig w;
  if (auto n = node["secret"]) w.secret = r.scalar(n, child_path(path, "secret"));
  if (auto n = node["timeout"]) w.timeout = r.duration(n, child_path(path, "timeout"));
  if (auto n = node["max_attempts"])
    w.max_attempts = static_cast<int>(r.integer(n, child_path(path, "max_attempts"), 1, 100));
  if (auto n = node["first_backoff"]) w.first_backoff = r.duration(n, child_path(path, "first_backoff"));
  if (auto n = node["allow_private"]) w.allow_private = r.boolean(n, child_path(path, "allow_private"));
  if (auto n = node["allow_hosts"]) w.allow_hosts = read_string_list(r, n, child_path(path, "allow_hosts"));
  if (w.timeout.count() <= 0) r.fail(child_path(path, "timeout"), "must be positive");
  return w;
}

JobsConfig read_jobs(const ConfigReader& r, const YAML::Node& node, const std::string& path) {
  r.expect_map(node, path, {"endpoints", "runsync_wait", "stream_wait", "purge_interval", "webhook"});
  JobsConfig j;
  if (auto n = node["endpoints"]) {
    auto where = child_path(path, "endpoints");
    if (!n.IsSequence()) r.fail(where, "expected a list");
    std::set<std::string> names;
    for (std::size_t i = 0; i < n.size(); ++i) {
      auto e = read_job_endpoint(r, n[i], where + "[" + std::to_string(i) + "]");
      if (!names.insert(e.name).second) r.fail(where, "endpoint '" + e.name + "' is defined twice");
      j.endpoints.push_back(std::move(e));
    }
  }
  if (auto n = node["runsync_wait"]) j.runsync_wait = r.duration(n, child_path(path, "runsync_wait"));
  if (auto n = node["stream_wait"]) j.stream_wait = r.duration(n, child_path(path, "stream_wait"));
  if (auto n = node["purge_interval"]) j.purge_interval = r.duration(n, child_path(path, "purge_interval"));
  if (j.purge_interval.count() <= 0) r.fail(child_path(path, "purge_interval"), "must be positive");
  if (auto n = node["webhook"]) j.webhook = read_webhook(r, n, child_path(path, "webhook"));
  return j;
}

}  // namespace

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
  ConfigReader r(source);
  Config c;
  if (root.IsNull()) return c;
  r.expect_map(root, "",
               {"listen", "database", "io_threads", "limits", "metering", "backends", "models", "routing",
                "app_upstream", "app_timeouts", "public_paths", "trusted_proxies", "jobs"});
  if (auto n = root["listen"]) {
    auto s = r.scalar(n, "listen");
    auto a = parse_listen(s);
    if (!a) r.fail("listen", "expected HOST:PORT, got '" + s + "'");
    c.listen = *a;
  }
  // ${VAR} lets a PostgreSQL URL take its password from the environment.
  if (auto n = root["database"]) c.database = backends::interpolate_env(r.string(n, "database"), "database");
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
  if (auto n = root["jobs"]) c.jobs = read_jobs(r, n, "jobs");
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
