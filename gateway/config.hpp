// The gateway's configuration: YAML with ${ENV} interpolation, validated at
// load (unknown keys are errors naming the key), or the embedded default.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backends/backend_factory.hpp"
#include "backends/config_reader.hpp"

namespace tollgate::gateway {

// Thrown for any configuration the gateway refuses, backends' sections included.
using backends::ConfigError;

struct ListenAddress {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8080;
};

struct ServerLimits {
  std::size_t max_body = 4 * 1024 * 1024;            // 413 past it
  std::size_t max_header = 16 * 1024;                // 431 past it
  std::chrono::milliseconds header_timeout{10'000};  // first byte to end of headers
  std::chrono::milliseconds body_timeout{30'000};    // end of headers to end of body
  std::chrono::milliseconds idle_timeout{60'000};    // keep-alive wait, and each write to a client
  std::chrono::milliseconds shutdown_grace{20'000};  // in-flight requests get this long on SIGTERM
  std::size_t max_connections = 10'000;
};

struct MeteringConfig {
  std::chrono::milliseconds flush_interval{1'000};
  bool per_user_metrics = false;
  // Tokens reserved for a completion that sets no max_tokens, until it settles.
  std::int64_t default_reserve_tokens = 1024;
  // On PostgreSQL, where replicas share budgets (docs/quotas.md): a lease not
  // drawn on this long goes back; and whether requests under a limit are
  // admitted past their leases (fail open) or refused with a 503 while the
  // database is unreachable.
  std::chrono::milliseconds lease_idle_return{1'000};
  // How often keys and users are read again when nothing announced a change
  // (PostgreSQL announces them as they commit; SQLite is polled at this pace).
  std::chrono::milliseconds key_refresh_interval{1'000};
  // Usage rows held in memory while the database cannot take them; past
  // that, and at a stop with the database away, they go to `spill_file` and
  // are written when it is back. Empty spill_file: on PostgreSQL, a file in
  // the system's temporary directory named after the listen port; on SQLite,
  // none (rows past the bound are dropped and counted).
  std::size_t max_queued_rows = 1'000'000;
  std::string spill_file;
  bool quota_fail_open = false;
};

// One `backends` entry: its name and type, and the rest of its section as its
// type read it (backends/backend_factory.hpp); `spec->as<EchoConfig>()` and the
// like read it back, `spec->make(context)` builds the backend.
struct BackendConfig {
  std::string name;
  std::string type;  // a name in backends::builtin_backend_types()
  std::shared_ptr<const backends::BackendSpec> spec;
};

struct DeploymentConfig {
  std::string backend;
  std::string model;         // the backend's name for it; defaults to the public name
  std::uint32_t weight = 1;  // share of traffic under the weighted strategy
};

struct ModelConfig {
  std::string name;
  std::vector<DeploymentConfig> deployments;
  bool least_busy = false;  // strategy: least_busy (fewest in flight) instead of weighted
};

// Passive health of deployments: consecutive retryable failures start a cooldown.
struct RoutingConfig {
  int cooldown_failures = 3;
  std::chrono::milliseconds cooldown{30'000};
};

// The app Tollgate fronts: every path the gateway does not own is proxied there.
struct AppUpstreamConfig {
  std::string url;  // as configured, e.g. "http://127.0.0.1:8081"
  std::string host;
  std::uint16_t port = 80;
  std::chrono::milliseconds connect_timeout{2'000};
  std::chrono::milliseconds first_byte_timeout{60'000};  // request sent to response headers
  std::chrono::milliseconds idle_timeout{60'000};        // between reads and writes on the app connection
};

// One job API endpoint: /v2/{name}/... runs jobs on a routed model.
struct JobEndpointConfig {
  std::string name;   // [A-Za-z0-9_-], at most 64
  std::string model;  // a routed model's public name
  std::size_t max_concurrency = 4;
  std::size_t max_queue = 1'000;  // IN_QUEUE jobs past this: 429
  std::chrono::milliseconds execution_timeout{600'000};
  std::chrono::milliseconds result_ttl{86'400'000};  // results kept this long after a job ends
  bool requeue_interrupted = false;  // a job cut by a restart runs again (else it FAILED)
  // sampling_params a job does not set: YAML scalars as written, e.g. max_tokens: "256".
  std::vector<std::pair<std::string, std::string>> defaults;
};

struct WebhookConfig {
  std::string secret;  // signs every delivery (HMAC-SHA256); empty: unsigned
  std::chrono::milliseconds timeout{10'000};
  int max_attempts = 5;
  std::chrono::milliseconds first_backoff{1'000};
  bool allow_private = false;  // loopback, private and link-local targets
  std::vector<std::string> allow_hosts;
};

struct JobsConfig {
  std::vector<JobEndpointConfig> endpoints;
  std::chrono::milliseconds runsync_wait{90'000};  // how long /runsync waits at most
  std::chrono::milliseconds stream_wait{2'000};    // how long /stream waits for new output
  std::chrono::milliseconds purge_interval{60'000};
  WebhookConfig webhook;
};

struct Config {
  ListenAddress listen;
  std::string database = "./tollgate.db";
  int io_threads = 0;  // 0: one per core
  ServerLimits limits;
  MeteringConfig metering;
  std::vector<BackendConfig> backends;
  std::vector<ModelConfig> models;
  RoutingConfig routing;
  std::optional<AppUpstreamConfig> app_upstream;
  // Proxied paths that skip authentication: exact, or a prefix when ending in '*'.
  std::vector<std::string> public_paths;
  // Peers whose X-Forwarded-* headers are kept (appended to); from others they are replaced.
  std::vector<std::string> trusted_proxies;
  JobsConfig jobs;
};

// Parses YAML text; `source` names it in error messages. Throws ConfigError.
Config parse_config(const std::string& yaml_text, const std::string& source);
Config load_config_file(const std::string& path);
// What `tollgate serve` runs with no --config.
Config embedded_default_config();
const std::string& embedded_default_yaml();

// "HOST:PORT", "[::1]:PORT", ":PORT".
std::optional<ListenAddress> parse_listen(const std::string& text);

}  // namespace tollgate::gateway
