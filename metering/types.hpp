// Plain data shared by the metering components: users, keys, limits, usage.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tollgate::metering {

// Milliseconds since the Unix epoch, UTC. Every timestamp in the store uses it.
using EpochMs = std::int64_t;

EpochMs now_ms();

// Per-subject limits; an empty optional means "no limit on this dimension".
struct Limits {
  std::optional<std::int64_t> requests_per_minute;
  std::optional<std::int64_t> tokens_per_minute;
  std::optional<std::int64_t> requests_per_day;
  std::optional<std::int64_t> tokens_per_day;
  std::optional<std::int64_t> tokens_per_month;

  bool any() const {
    return requests_per_minute || tokens_per_minute || requests_per_day || tokens_per_day || tokens_per_month;
  }
  bool operator==(const Limits&) const = default;
};

struct User {
  std::int64_t id = 0;
  std::string name;
  EpochMs created_at = 0;
  Limits limits;
};

// An API key as stored: never the key itself, only its SHA-256 and a display prefix.
struct ApiKey {
  std::int64_t id = 0;
  std::int64_t user_id = 0;
  std::string user_name;
  std::string prefix;      // e.g. "tg-3kF9aQ2x", shown in listings and used to revoke
  std::string sha256_hex;  // lowercase hex of SHA-256(full key)
  EpochMs created_at = 0;
  std::optional<EpochMs> expires_at;
  std::optional<EpochMs> revoked_at;
  std::vector<std::string> models;  // empty: every model allowed
  Limits limits;

  bool active(EpochMs now) const { return !revoked_at && (!expires_at || *expires_at > now); }
  bool allows_model(const std::string& model) const;
};

// One row per call on every route.
struct UsageEvent {
  EpochMs ts = 0;  // when the request arrived
  std::optional<std::int64_t> user_id;
  std::optional<std::int64_t> key_id;
  std::string route;    // e.g. "/v1/chat/completions"
  std::string model;    // public model name, empty when none
  std::string backend;  // backend name, empty when none
  int status = 0;       // HTTP status sent to the client
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t latency_us = 0;
  std::optional<std::int64_t> ttft_us;  // time to first token, streaming completions only
  bool counted = false;                 // admitted by the quota limiter (consumes request quota)
  bool estimated = false;               // token counts were estimated, not reported by the backend
  // Unique per metered request (the usage writer assigns it): a batch written
  // twice, after a commit whose outcome was lost, is stored once. Empty: none.
  std::string request_id;
};

// Aggregated usage, as reports show it.
struct UsageRow {
  std::string user;
  std::string day;    // YYYY-MM-DD (UTC); empty when aggregated over days
  std::string model;  // empty when aggregated over models
  std::int64_t requests = 0;
  std::int64_t errors = 0;  // status >= 400
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
};

struct UsageQuery {
  std::optional<std::string> user;
  std::optional<EpochMs> since;  // inclusive, rounded down to its UTC day
  bool by_day = false;
  bool by_model = false;
};

// Counts inside the current quota windows, used to rebuild the limiter at start.
struct WindowCounts {
  std::int64_t requests = 0;
  std::int64_t tokens = 0;
};
struct SubjectUsage {
  WindowCounts minute;  // the current UTC minute
  WindowCounts day;     // the current UTC day
  WindowCounts month;   // the current UTC month
};

}  // namespace tollgate::metering
