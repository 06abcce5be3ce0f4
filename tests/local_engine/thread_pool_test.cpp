#include "local_engine/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

using tollgate::local_engine::ThreadPool;

namespace {

// Records the chunks one parallel_for hands out.
std::vector<std::pair<std::int64_t, std::int64_t>> chunks_of(ThreadPool& pool, std::int64_t n, int per_thread) {
  std::mutex mutex;
  std::vector<std::pair<std::int64_t, std::int64_t>> chunks;
  pool.parallel_for(
      n,
      [&](std::int64_t begin, std::int64_t end) {
        std::lock_guard lock(mutex);
        chunks.emplace_back(begin, end);
      },
      per_thread);
  std::sort(chunks.begin(), chunks.end());
  return chunks;
}

}  // namespace

TEST_CASE("ThreadPool size counts the caller", "[thread_pool]") {
  CHECK(ThreadPool(1).size() == 1);
  CHECK(ThreadPool(3).size() == 3);
  auto hw = static_cast<int>(std::thread::hardware_concurrency());
  CHECK(ThreadPool(0).size() == std::max(hw, 1));
}

TEST_CASE("parallel_for covers 0..n-1 in at most size() * per_thread contiguous chunks", "[thread_pool]") {
  for (int threads : {1, 2, 3, 4}) {
    ThreadPool pool(threads);
    for (int per_thread : {1, 4}) {
      for (std::int64_t n : {1, 2, 3, 5, 7, 100, 1001}) {
        INFO("threads " << threads << ", per thread " << per_thread << ", n " << n);
        auto chunks = chunks_of(pool, n, per_thread);
        // One thread runs everything as one chunk on the caller.
        auto expected = threads == 1 ? 1 : std::min<std::int64_t>(n, threads * per_thread);
        REQUIRE(static_cast<std::int64_t>(chunks.size()) == expected);
        std::int64_t next = 0;
        for (std::size_t i = 0; i < chunks.size(); ++i) {
          // The documented split: chunk i is [n*i/c, n*(i+1)/c).
          auto c = static_cast<std::int64_t>(i);
          CHECK(chunks[i].first == next);
          CHECK(chunks[i].first == n * c / expected);
          CHECK(chunks[i].second == n * (c + 1) / expected);
          CHECK(chunks[i].second > chunks[i].first);
          next = chunks[i].second;
        }
        CHECK(next == n);
      }
    }
  }
}

TEST_CASE("parallel_for visits every index exactly once and sums right", "[thread_pool]") {
  ThreadPool pool(3);
  const std::int64_t n = 100'003;
  std::vector<std::atomic<int>> visits(static_cast<std::size_t>(n));
  std::atomic<std::int64_t> sum{0};
  pool.parallel_for(n, [&](std::int64_t begin, std::int64_t end) {
    std::int64_t local = 0;
    for (auto i = begin; i < end; ++i) {
      visits[static_cast<std::size_t>(i)].fetch_add(1);
      local += i;
    }
    sum += local;
  });
  CHECK(sum.load() == n * (n - 1) / 2);
  for (auto& v : visits) REQUIRE(v.load() == 1);
}

TEST_CASE("parallel_for with fewer items than threads", "[thread_pool]") {
  ThreadPool pool(4);
  std::atomic<int> calls{0};
  std::atomic<std::int64_t> covered{0};
  pool.parallel_for(2, [&](std::int64_t begin, std::int64_t end) {
    ++calls;
    covered += end - begin;
  });
  CHECK(calls.load() == 2);
  CHECK(covered.load() == 2);
}

TEST_CASE("parallel_for with n == 0 calls nothing", "[thread_pool]") {
  ThreadPool pool(3);
  int calls = 0;
  pool.parallel_for(0, [&](std::int64_t, std::int64_t) { ++calls; });
  pool.parallel_for(-5, [&](std::int64_t, std::int64_t) { ++calls; });
  CHECK(calls == 0);
}

TEST_CASE("many rapid calls in a row", "[thread_pool]") {
  ThreadPool pool(2);
  std::atomic<std::int64_t> total{0};
  const int calls = 50'000;
  auto start = std::chrono::steady_clock::now();
  for (int c = 0; c < calls; ++c) {
    pool.parallel_for(64, [&](std::int64_t begin, std::int64_t end) { total += end - begin; });
  }
  auto elapsed = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  CHECK(total.load() == std::int64_t{64} * calls);
  WARN("parallel_for round trip: " << elapsed / calls << " us per call");
}

TEST_CASE("workers woken from sleep still take their chunks", "[thread_pool]") {
  ThreadPool pool(3);
  for (int round = 0; round < 5; ++round) {
    // Longer than the spin phase, so the workers are asleep on the condition variable.
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    std::atomic<int> chunks{0};
    std::atomic<std::int64_t> covered{0};
    pool.parallel_for(9, [&](std::int64_t begin, std::int64_t end) {
      ++chunks;
      covered += end - begin;
    });
    CHECK(chunks.load() == 3);
    CHECK(covered.load() == 9);
  }
}

TEST_CASE("chunks run concurrently on distinct threads", "[thread_pool]") {
  ThreadPool pool(2);
  std::mutex mutex;
  std::vector<std::thread::id> ids;
  std::atomic<int> started{0};
  std::atomic<bool> timed_out{false};
  pool.parallel_for(2, [&](std::int64_t, std::int64_t) {
    {
      std::lock_guard lock(mutex);
      ids.push_back(std::this_thread::get_id());
    }
    // Each chunk waits for the other to start: only two threads can get past.
    ++started;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < 2) {
      if (std::chrono::steady_clock::now() > deadline) {
        timed_out = true;
        break;
      }
      std::this_thread::yield();
    }
  });
  CHECK_FALSE(timed_out.load());
  REQUIRE(ids.size() == 2);
  CHECK(ids[0] != ids[1]);
}

TEST_CASE("pools shut down cleanly", "[thread_pool]") {
  for (int i = 0; i < 50; ++i) {
    ThreadPool idle(3);  // destroyed without ever running a job
  }
  for (int i = 0; i < 50; ++i) {
    ThreadPool pool(3);
    std::atomic<int> sum{0};
    pool.parallel_for(10, [&](std::int64_t begin, std::int64_t end) { sum += static_cast<int>(end - begin); });
    CHECK(sum.load() == 10);
  }
  {
    ThreadPool pool(2);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // workers asleep
  }
  SUCCEED();
}
