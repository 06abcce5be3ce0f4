// Write-behind log of usage events: the request path enqueues, one writer thread
// batches many rows per transaction.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "metering/store.hpp"

namespace tollgate::metering {

class UsageWriter {
 public:
  struct Stats {
    std::uint64_t written = 0;  // rows committed
    std::uint64_t batches = 0;
    std::uint64_t failures = 0;  // batches that failed and were retried
    std::uint64_t dropped = 0;   // rows refused because max_queued were waiting
  };
  // Called after each committed batch with its size and duration (for metrics).
  using FlushObserver = std::function<void(std::size_t rows, std::chrono::microseconds took)>;

  // Rows held in memory at most (waiting, or being written): while the store
  // keeps failing, the rows past it are dropped rather than memory exhausted.
  static constexpr std::size_t kDefaultMaxQueued = 1'000'000;

  // The writer owns `store` (its own connection) and flushes at least every
  // `flush_interval`, or sooner when `max_batch` rows are waiting.
  UsageWriter(std::unique_ptr<Store> store, std::chrono::milliseconds flush_interval, std::size_t max_batch = 4096,
              FlushObserver observer = {}, std::size_t max_queued = kDefaultMaxQueued);
  ~UsageWriter();  // stop()s

  UsageWriter(const UsageWriter&) = delete;
  UsageWriter& operator=(const UsageWriter&) = delete;

  // Never blocks on the disk: appends to an in-memory queue. Returns false when
  // the row was dropped because max_queued rows are held already.
  bool enqueue(UsageEvent event);
  // Writes everything enqueued so far and returns when it is committed.
  void flush();
  // Flushes and joins the writer thread. Idempotent.
  void stop();

  std::size_t queue_depth() const { return depth_.load(std::memory_order_relaxed); }
  Stats stats() const;

 private:
  void run();
  bool write_after_stop(UsageEvent event);

  std::unique_ptr<Store> store_;
  std::chrono::milliseconds flush_interval_;
  std::size_t max_batch_;
  FlushObserver observer_;
  std::size_t max_queued_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable flushed_;
  std::vector<UsageEvent> queue_;
  std::size_t writing_ = 0;             // rows of the batch being written (guarded by mutex_)
  std::uint64_t dropped_unlogged_ = 0;  // drops since the last log line (guarded by mutex_)
  std::uint64_t enqueued_ = 0;          // total ever enqueued (guarded by mutex_)
  std::uint64_t committed_ = 0;         // total ever committed (guarded by mutex_)
  bool flush_requested_ = false;
  bool stopping_ = false;
  bool writer_done_ = false;  // the writer thread has exited (guarded by mutex_)
  Stats stats_;
  std::atomic<std::size_t> depth_{0};
  std::string id_prefix_;      // random per writer: request ids are unique across replicas
  std::uint64_t next_id_ = 0;  // guarded by mutex_
  std::mutex stop_mutex_;      // serialises stop() so only one caller joins
  std::thread thread_;
};

}  // namespace tollgate::metering
