#include "gateway/auth.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <map>
#include <thread>

#include "metering/api_key.hpp"

namespace tollgate::gateway {

std::optional<std::string_view> presented_key(std::string_view authorization, std::string_view x_api_key) {
  auto trim = [](std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
  };
  // x-api-key first: beside it, Authorization is the app's own (a JWT, Basic).
  x_api_key = trim(x_api_key);
  if (!x_api_key.empty()) return x_api_key;
  authorization = trim(authorization);
  constexpr std::string_view kBearer = "bearer ";
  if (authorization.size() > kBearer.size()) {
    bool is_bearer = true;
    for (std::size_t i = 0; i < kBearer.size(); ++i) {
      if (std::tolower(static_cast<unsigned char>(authorization[i])) != kBearer[i]) is_bearer = false;
    }
    if (is_bearer) {
      auto key = trim(authorization.substr(kBearer.size()));
      if (!key.empty()) return key;
    }
  }
  return std::nullopt;
}

KeyCache::KeyCache(std::unique_ptr<metering::Store> store) : store_(std::move(store)) {
  std::lock_guard lock(store_mutex_);
  loaded_version_ = store_->keys_version();
  reload();
}

KeyCache::~KeyCache() {
  {
    std::lock_guard lock(stop_mutex_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (refresher_.joinable()) refresher_.join();
}

void KeyCache::reload() {
  std::map<std::int64_t, metering::Limits> user_limits;
  for (const auto& user : store_->list_users()) user_limits[user.id] = user.limits;
  auto snapshot = std::make_shared<Snapshot>();
  for (auto& key : store_->list_keys()) {
    auto entry = std::make_shared<KeyEntry>();
    entry->user_limits = user_limits[key.user_id];
    std::string hash = key.sha256_hex;
    entry->key = std::move(key);
    snapshot->emplace(std::move(hash), std::move(entry));
  }
  std::lock_guard lock(snapshot_mutex_);
  snapshot_ = std::move(snapshot);
}

bool KeyCache::refresh_if_changed() {
  std::lock_guard lock(store_mutex_);
  return refresh_locked();
}

bool KeyCache::refresh_locked() {
  refreshes_started_.fetch_add(1);
  last_refresh_started_.store(std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    auto version = store_->keys_version();  // one single-row read: cheap when nothing changed
    const bool changed = version != loaded_version_;
    if (changed) {
      reload();
      loaded_version_ = version;
    }
    std::lock_guard lock(reach_mutex_);
    if (!reach_.ok) std::cerr << "tollgate: the key store answers again\n";
    reach_ = StoreReach{};
    return changed;
  } catch (const std::exception& e) {
    std::lock_guard lock(reach_mutex_);
    // Said once when it starts failing, not at every refresh while it does.
    if (reach_.ok) {
      std::cerr << "tollgate: key refresh failed, serving the keys loaded before: " << e.what() << "\n";
      reach_.since = metering::now_ms();
    }
    reach_.ok = false;
    reach_.error = e.what();
    throw;
  }
}

KeyCache::StoreReach KeyCache::store_reach() const {
  std::lock_guard lock(reach_mutex_);
  return reach_;
}

std::chrono::steady_clock::duration KeyCache::miss_delay() const {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point next(Clock::duration(last_refresh_started_.load()) + min_miss_interval);
  return std::max(Clock::duration::zero(), next - Clock::now());
}

AuthOutcome KeyCache::authenticate_after_refresh(std::string_view key, std::uint64_t ticket, metering::EpochMs now) {
  {
    std::unique_lock lock(store_mutex_);
    // Holding the lock, a refresh that began after the miss has finished too.
    while (refreshes_started_.load() < ticket) {
      if (auto wait = miss_delay(); wait > wait.zero()) {
        // Too soon after the last refresh: wait without the lock, so misses
        // that a refresh already answered are not held up meanwhile.
        lock.unlock();
        std::this_thread::sleep_for(wait);
        lock.lock();
        continue;
      }
      try {
        refresh_locked();
      } catch (const std::exception&) {
        // A busy or unreachable database (logged, and on /readyz): answer from the snapshot we have.
      }
    }
  }
  return authenticate(key, now);
}

// Until `interval` has passed, stopping_ or the store announces a change.
void KeyCache::wait_for_change(std::chrono::milliseconds interval) {
  using Clock = std::chrono::steady_clock;
  const auto until = Clock::now() + interval;
  if (store_->announces_access_changes()) {
    try {
      while (Clock::now() < until) {
        {
          std::lock_guard lock(stop_mutex_);
          if (stopping_) return;
        }
        // In slices, so a stop is noticed soon.
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
        if (store_->wait_for_access_change(std::min(left, std::chrono::milliseconds(100)))) return;
      }
      return;
    } catch (const std::exception&) {
      // Unreachable: the refresh says so; wait out the rest of the interval.
    }
  }
  std::unique_lock lock(stop_mutex_);
  stop_cv_.wait_until(lock, until, [this] { return stopping_; });
}

void KeyCache::start_refreshing(std::chrono::milliseconds interval) {
  refresher_ = std::thread([this, interval] {
    std::unique_lock lock(stop_mutex_);
    while (!stopping_) {
      lock.unlock();
      wait_for_change(interval);
      lock.lock();
      if (stopping_) break;
      lock.unlock();
      try {
        refresh_if_changed();
      } catch (const std::exception&) {
        // A busy or unreachable database only delays the refresh (logged, and on /readyz).
      }
      lock.lock();
    }
  });
}

AuthOutcome KeyCache::authenticate(std::string_view key, metering::EpochMs now) const {
  std::shared_ptr<const Snapshot> snapshot;
  {
    std::lock_guard lock(snapshot_mutex_);
    snapshot = snapshot_;
  }
  auto it = snapshot->find(metering::sha256_hex(key));
  if (it == snapshot->end()) return {AuthOutcome::Status::unknown, nullptr};
  const auto& k = it->second->key;
  if (k.revoked_at) return {AuthOutcome::Status::revoked, it->second};
  if (k.expires_at && *k.expires_at <= now) return {AuthOutcome::Status::expired, it->second};
  return {AuthOutcome::Status::ok, it->second};
}

bool AdminKey::matches(std::string_view presented) const {
  return metering::constant_time_equal(metering::sha256_hex(presented), sha256_hex);
}

AdminKey establish_admin_key(metering::Store& store) {
  if (const char* env = std::getenv("TOLLGATE_ADMIN_KEY"); env && *env) {
    return {metering::sha256_hex(env), std::nullopt};
  }
  if (auto stored = store.get_setting("admin_key_sha256")) return {*stored, std::nullopt};
  auto generated = metering::generate_api_key("tg-admin-");
  store.put_setting("admin_key_sha256", generated.sha256_hex);
  return {generated.sha256_hex, generated.plaintext};
}

}  // namespace tollgate::gateway
