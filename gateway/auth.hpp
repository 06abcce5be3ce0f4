// API key authentication from an in-memory snapshot of the key table, so the
// request path never touches the disk. The snapshot follows changes made by any
// process (CLI, admin API) within a refresh interval.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "metering/store.hpp"

namespace tollgate::gateway {

// A key with what authorisation and quotas need about its user.
struct KeyEntry {
  metering::ApiKey key;
  metering::Limits user_limits;
};

struct AuthOutcome {
  enum class Status { ok, missing, unknown, revoked, expired };
  Status status = Status::missing;
  std::shared_ptr<const KeyEntry> entry;  // set unless missing or unknown
};

// The key a request presents: "x-api-key: KEY", else "Authorization: Bearer KEY"
// (so an app behind the proxy can still receive its own Authorization).
std::optional<std::string_view> presented_key(std::string_view authorization, std::string_view x_api_key);

class KeyCache {
 public:
  // Reads through its own store connection. Loads the snapshot before returning.
  explicit KeyCache(std::unique_ptr<metering::Store> store);
  ~KeyCache();

  AuthOutcome authenticate(std::string_view key, metering::EpochMs now) const;

  // Reloads when the store changed since the last load; returns whether it did.
  bool refresh_if_changed();
  // Re-reads the snapshot every `interval` on a background thread until destroyed.
  void start_refreshing(std::chrono::milliseconds interval);

 private:
  using Snapshot = std::unordered_map<std::string, std::shared_ptr<const KeyEntry>>;
  void reload();

  std::unique_ptr<metering::Store> store_;
  std::mutex store_mutex_;  // one refresher at a time
  std::int64_t loaded_version_ = -1;

  mutable std::mutex snapshot_mutex_;
  std::shared_ptr<const Snapshot> snapshot_;

  std::mutex stop_mutex_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread refresher_;
};

// The admin key: from TOLLGATE_ADMIN_KEY when set, else the one stored in the
// database, else a new one created now (its plaintext returned once to print).
struct AdminKey {
  std::string sha256_hex;
  std::optional<std::string> created_plaintext;

  bool matches(std::string_view presented) const;
};
AdminKey establish_admin_key(metering::Store& store);

}  // namespace tollgate::gateway
