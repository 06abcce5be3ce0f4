#include "local_engine/thread_pool.hpp"

#include <algorithm>
#include <cassert>
#include <chrono>

namespace tollgate::local_engine {

namespace {

// A worker spins this long for the next job before sleeping: the engine calls
// parallel_for ~100 times per token with short single-threaded gaps between,
// and a futex wake-up costs far more than the gap.
constexpr auto kSpinFor = std::chrono::microseconds(200);

constexpr std::uint64_t pack(std::uint64_t generation, std::uint64_t chunks, std::uint64_t next) {
  return generation << 32 | chunks << 16 | next;
}
constexpr std::uint64_t generation_of(std::uint64_t state) { return state >> 32; }
constexpr std::uint64_t chunks_of(std::uint64_t state) { return (state >> 16) & 0xffffu; }
constexpr std::uint64_t next_of(std::uint64_t state) { return state & 0xffffu; }

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  threads = std::clamp(threads, 1, 0xffff);
  workers_.reserve(static_cast<std::size_t>(threads - 1));
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

ThreadPool::~ThreadPool() {
  stopping_ = true;
  state_.store(pack(++generation_ & 0xffffffffu, 0, 0), std::memory_order_seq_cst);
  {
    std::lock_guard lock(mutex_);
    wake_.notify_all();
  }
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run(std::int64_t n, int chunks, Trampoline call, const void* fn) {
  const std::uint64_t g = ++generation_ & 0xffffffffu;
  call_ = call;
  fn_ = fn;
  n_ = n;
  done_.store(0, std::memory_order_relaxed);
  // seq_cst here and in await_generation: either a worker sees the new
  // generation or we see it counted as a sleeper and wake it.
  state_.store(pack(g, static_cast<std::uint64_t>(chunks), 0), std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard lock(mutex_);
    wake_.notify_all();
  }
  int done = run_chunks(g);
  if (done == chunks) return;
  auto deadline = std::chrono::steady_clock::now() + kSpinFor;
  for (int spins = 0; done_.load(std::memory_order_acquire) + done != chunks; ++spins) {
    // A worker preempted mid-chunk needs its core back.
    if (spins % 64 == 63 && std::chrono::steady_clock::now() > deadline) {
      std::this_thread::yield();
    } else {
      cpu_relax();
    }
  }
}

int ThreadPool::run_chunks(std::uint64_t g) {
  int ran = 0;
  std::uint64_t state = state_.load(std::memory_order_acquire);
  while (generation_of(state) == g && next_of(state) < chunks_of(state)) {
    if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acquire, std::memory_order_acquire)) {
      continue;
    }
    const auto chunks = static_cast<std::int64_t>(chunks_of(state));
    const auto i = static_cast<std::int64_t>(next_of(state));
    call_(fn_, n_ * i / chunks, n_ * (i + 1) / chunks);
    ++ran;
    state = state_.load(std::memory_order_acquire);
  }
  return ran;
}

std::uint64_t ThreadPool::await_generation(std::uint64_t seen) {
  auto deadline = std::chrono::steady_clock::now() + kSpinFor;
  for (int spins = 0;; ++spins) {
    std::uint64_t g = generation_of(state_.load(std::memory_order_acquire));
    if (g != seen) return g;
    if (spins % 64 == 63 && std::chrono::steady_clock::now() > deadline) break;
    cpu_relax();
  }
  std::unique_lock lock(mutex_);
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  std::uint64_t g;
  wake_.wait(lock, [&] { return (g = generation_of(state_.load(std::memory_order_seq_cst))) != seen; });
  sleepers_.fetch_sub(1, std::memory_order_relaxed);
  return g;
}

void ThreadPool::work() {
  std::uint64_t seen = 0;
  for (;;) {
    seen = await_generation(seen);
    if (stopping_) return;
    if (int ran = run_chunks(seen); ran > 0) done_.fetch_add(ran, std::memory_order_release);
  }
}

}  // namespace tollgate::local_engine
