// API key authentication from an in-memory snapshot of the key table, so the
// request path never touches the disk. The snapshot follows changes made by any
// process (CLI, admin API) within a refresh interval, and a key it does not know
// is looked up again (rate-limited, off the io threads) before it is refused.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
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

  // A key unknown to the snapshot may have been created a moment ago (by the
  // CLI, or another replica). On such a miss the caller takes a ticket at once,
  // then, on a thread that may block, calls authenticate_after_refresh: it
  // waits for a refresh that began after the miss (running one itself unless
  // another did) and looks the key up again. Refreshes are at least
  // `min_miss_interval` apart, so a flood of random keys costs at most one
  // cheap version read per interval, shared by every miss waiting for it.
  std::uint64_t miss_ticket() const { return refreshes_started_.load() + 1; }
  AuthOutcome authenticate_after_refresh(std::string_view key, std::uint64_t ticket, metering::EpochMs now);
  static constexpr std::chrono::milliseconds min_miss_interval{50};
  // How long until a refresh may start: a caller that must not block waits
  // this out (on a timer) before calling authenticate_after_refresh.
  std::chrono::steady_clock::duration miss_delay() const;

  // Reloads when the store changed since the last load; returns whether it did.
  bool refresh_if_changed();
  // Refreshes so far (each one reads the store's keys_version), for tests and metrics.
  std::uint64_t refreshes() const { return refreshes_started_.load(); }
  // Re-reads the snapshot every `interval` on a background thread until destroyed.
  void start_refreshing(std::chrono::milliseconds interval);

  // Whether the last refresh reached the store; if not, why and since when (for /readyz).
  struct StoreReach {
    bool ok = true;
    std::string error;
    metering::EpochMs since = 0;
  };
  StoreReach store_reach() const;

 private:
  using Snapshot = std::unordered_map<std::string, std::shared_ptr<const KeyEntry>>;
  void reload();
  bool refresh_locked();  // store_mutex_ held
  void wait_for_change(std::chrono::milliseconds interval);

  std::unique_ptr<metering::Store> store_;
  std::mutex store_mutex_;  // one refresher at a time
  std::int64_t loaded_version_ = -1;
  // Both written with store_mutex_ held; read without it by miss_ticket() and miss_delay().
  std::atomic<std::uint64_t> refreshes_started_{0};
  std::atomic<std::chrono::steady_clock::rep> last_refresh_started_{0};  // steady_clock ticks

  mutable std::mutex reach_mutex_;
  StoreReach reach_;

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
