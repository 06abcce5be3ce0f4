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
#include <string>
#include <thread>
#include <vector>

#include "metering/store.hpp"
#include "metering/usage_spill.hpp"

namespace tollgate::metering {

class UsageWriter {
 public:
  struct Stats {
    std::uint64_t written = 0;  // rows committed
    std::uint64_t batches = 0;
    std::uint64_t failures = 0;  // batches that failed and were retried
    std::uint64_t dropped = 0;   // rows lost: max_queued were waiting and there is no spill file, or it failed
    std::uint64_t spilled = 0;   // rows kept in the spill file
    std::uint64_t replayed = 0;  // rows from the spill file written to the store
  };
  // Called after each committed batch with its size and duration (for metrics).
  using FlushObserver = std::function<void(std::size_t rows, std::chrono::microseconds took)>;

  // Rows held in memory at most (waiting, or being written): while the store
  // keeps failing, the rows past it are dropped rather than memory exhausted.
  static constexpr std::size_t kDefaultMaxQueued = 1'000'000;

  // The writer owns `store` (its own connection) and flushes at least every
  // `flush_interval`, or sooner when `max_batch` rows are waiting. With a
  // `spill_path`, rows past `max_queued`, and those the store cannot take at
  // stop, go to that file (metering/usage_spill.hpp) and are written to the
  // store when it takes rows again; rows a previous run left there too.
  UsageWriter(std::unique_ptr<Store> store, std::chrono::milliseconds flush_interval, std::size_t max_batch = 4096,
              FlushObserver observer = {}, std::size_t max_queued = kDefaultMaxQueued, std::string spill_path = {});
  ~UsageWriter();  // stop()s

  UsageWriter(const UsageWriter&) = delete;
  UsageWriter& operator=(const UsageWriter&) = delete;

  // Never blocks on the disk: appends to an in-memory queue (past max_queued,
  // to the rows the writer thread spills). Returns false when the row was dropped.
  bool enqueue(UsageEvent event);
  // Writes everything queued so far and returns when it is committed (rows
  // sent to the spill file are written when the store takes them).
  void flush();
  // Flushes and joins the writer thread. Idempotent.
  void stop();

  std::size_t queue_depth() const { return depth_.load(std::memory_order_relaxed); }
  // Rows in the spill file, waiting for the store.
  std::size_t spill_depth() const { return spill_depth_.load(std::memory_order_relaxed); }
  Stats stats() const;

 private:
  void run();
  bool write_after_stop(UsageEvent event);
  void spill_overflow(std::unique_lock<std::mutex>& lock);
  bool replay_spill(std::unique_lock<std::mutex>& lock);

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
  std::unique_ptr<UsageSpill> spill_;      // used by the writer thread only
  std::vector<UsageEvent> overflow_;       // past max_queued, for the spill file (guarded by mutex_)
  static constexpr std::size_t kMaxOverflow = 65'536;
  std::atomic<std::size_t> spill_depth_{0};
  std::string id_prefix_;      // random per writer: request ids are unique across replicas
  std::uint64_t next_id_ = 0;  // guarded by mutex_
  std::mutex stop_mutex_;      // serialises stop() so only one caller joins
  std::thread thread_;
};

}  // namespace tollgate::metering
