#include "gateway/auth.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>
#include <vector>

#include "metering/api_key.hpp"
#include "tests/metering/temp_database.hpp"

using namespace tollgate;
using gateway::AuthOutcome;
using gateway::KeyCache;
using metering::test::TempDatabase;
using namespace std::chrono_literals;

namespace {

std::string insert_key(metering::Store& store, const std::string& user) {
  auto generated = metering::generate_api_key();
  metering::NewKey key;
  key.user_name = user;
  key.prefix = generated.prefix;
  key.sha256_hex = generated.sha256_hex;
  store.insert_key(key);
  return generated.plaintext;
}

}  // namespace

TEST_CASE("a key created after the snapshot is found on its first miss", "[gateway][auth]") {
  TempDatabase db;
  auto writer = metering::open_sqlite_store(db.path());
  KeyCache cache(metering::open_sqlite_store(db.path()));
  for (int i = 0; i < 5; ++i) {
    auto key = insert_key(*writer, "user" + std::to_string(i));
    auto now = metering::now_ms();
    REQUIRE(cache.authenticate(key, now).status == AuthOutcome::Status::unknown);
    auto outcome = cache.authenticate_after_refresh(key, cache.miss_ticket(), now);
    CHECK(outcome.status == AuthOutcome::Status::ok);
    REQUIRE(outcome.entry);
    CHECK(outcome.entry->key.user_name == "user" + std::to_string(i));
  }
}

TEST_CASE("a flood of unknown keys shares refreshes: at most one per 50 ms", "[gateway][auth]") {
  TempDatabase db;
  auto writer = metering::open_sqlite_store(db.path());
  insert_key(*writer, "alice");
  KeyCache cache(metering::open_sqlite_store(db.path()));
  const auto refreshes_before = cache.refreshes();
  const auto started = std::chrono::steady_clock::now();
  constexpr int kThreads = 8, kEach = 40;
  std::vector<std::thread> threads;
  std::atomic<int> refused{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        auto key = "tg-random-" + std::to_string(t) + "-" + std::to_string(i);
        auto now = metering::now_ms();
        if (cache.authenticate_after_refresh(key, cache.miss_ticket(), now).status == AuthOutcome::Status::unknown) {
          ++refused;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  const auto took = std::chrono::steady_clock::now() - started;
  const auto refreshes = cache.refreshes() - refreshes_before;
  CHECK(refused == kThreads * kEach);
  // Every one of the misses needed a refresh that began after it, and one per interval served them all.
  const auto intervals = took / KeyCache::min_miss_interval;
  INFO(refreshes << " refreshes in " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
  CHECK(refreshes <= static_cast<std::uint64_t>(intervals) + 1);
  // Concurrent misses share a refresh: far fewer refreshes than misses.
  CHECK(refreshes <= kEach * 2);
}
