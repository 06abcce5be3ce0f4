// A fixed pool of worker threads for data-parallel loops: the caller's thread
// takes part, the call returns when every chunk is done.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace tollgate::local_engine {

// One caller at a time: parallel_for must not be called concurrently from two
// threads on the same pool, nor from inside fn.
class ThreadPool {
 public:
  // threads <= 0: one per hardware thread. The pool owns threads - 1 workers.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over contiguous chunks of [0, n): chunk i is
  // [n*i/c, n*(i+1)/c) for c = min(n, size() * per_thread, 65535), claimed
  // by whichever thread is free, so more chunks per thread even out threads
  // that start late or are descheduled. fn must be safe to run concurrently
  // on disjoint ranges and must not throw. Allocates nothing; n <= 0 returns
  // at once, n == 1 runs on the caller.
  template <typename Fn>
  void parallel_for(std::int64_t n, Fn&& fn, int per_thread = 1) {
    if (n <= 0) return;
    if (n == 1 || workers_.empty()) {
      fn(std::int64_t{0}, n);
      return;
    }
    using F = std::remove_reference_t<Fn>;
    const std::int64_t chunks = std::min<std::int64_t>({n, std::int64_t{size()} * std::max(per_thread, 1), 0xffff});
    run(n, static_cast<int>(chunks), &invoke<F>, static_cast<const void*>(std::addressof(fn)));
  }

 private:
  using Trampoline = void (*)(const void*, std::int64_t, std::int64_t);
  template <typename F>
  static void invoke(const void* fn, std::int64_t begin, std::int64_t end) {
    (*static_cast<F*>(const_cast<void*>(fn)))(begin, end);
  }
  void run(std::int64_t n, int chunks, Trampoline call, const void* fn);
  void work();
  // Spins on state_ for a generation other than seen, then sleeps on wake_.
  std::uint64_t await_generation(std::uint64_t seen);
  // Claims and runs chunks of generation g until none are left; returns how many ran.
  int run_chunks(std::uint64_t g);

  std::vector<std::thread> workers_;

  // The current job; written by the caller before it publishes a generation
  // in state_ (release), read only by a thread that claimed one of its chunks
  // (acquire), so a late worker never sees a half-written job.
  Trampoline call_ = nullptr;
  const void* fn_ = nullptr;
  std::int64_t n_ = 0;
  std::uint64_t generation_ = 0;  // the caller's count of jobs
  std::atomic<bool> stopping_{false};

  // Chunks are claimed, not assigned: the caller takes any a busy or
  // descheduled worker has not started, so it never waits for a thread that
  // is not running. state_ packs generation (32 bits), chunk count and next
  // chunk (16 bits each) so a claim can never take a chunk of the wrong job.
  alignas(64) std::atomic<std::uint64_t> state_{0};
  alignas(64) std::atomic<int> done_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace tollgate::local_engine
