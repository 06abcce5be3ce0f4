#include "metering/usage_writer.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <iterator>
#include <random>
#include <string>

namespace tollgate::metering {

UsageWriter::UsageWriter(std::unique_ptr<Store> store, std::chrono::milliseconds flush_interval, std::size_t max_batch,
                         FlushObserver observer, std::size_t max_queued, std::string spill_path)
    : store_(std::move(store)),
      flush_interval_(std::max(flush_interval, std::chrono::milliseconds(1))),
      max_batch_(std::max<std::size_t>(max_batch, 1)),
      observer_(std::move(observer)),
      max_queued_(std::max<std::size_t>(max_queued, 1)) {
  std::random_device random;
  char prefix[17];
  std::snprintf(prefix, sizeof prefix, "%08x%08x", static_cast<unsigned>(random()), static_cast<unsigned>(random()));
  id_prefix_ = prefix;
  if (!spill_path.empty()) {
    spill_ = std::make_unique<UsageSpill>(std::move(spill_path));
    spill_depth_.store(spill_->pending(), std::memory_order_relaxed);
    if (spill_->pending() > 0) {
      std::fprintf(stderr, "usage writer: %zu usage rows left in %s, writing them to the store\n", spill_->pending(),
                   spill_->path().c_str());
    }
  }
  thread_ = std::thread([this] { run(); });
}

UsageWriter::~UsageWriter() { stop(); }

bool UsageWriter::enqueue(UsageEvent event) {
  std::unique_lock lock(mutex_);
  if (event.request_id.empty()) {
    char sequence[17];
    std::snprintf(sequence, sizeof sequence, "%016llx", static_cast<unsigned long long>(next_id_++));
    event.request_id = id_prefix_ + sequence;
  }
  if (writer_done_) return write_after_stop(std::move(event));
  if (queue_.size() + writing_ >= max_queued_) {
    if (spill_ && overflow_.size() < kMaxOverflow) {
      // The writer thread takes them to the spill file: no disk on this thread.
      overflow_.push_back(std::move(event));
      const bool wake = overflow_.size() == 1;
      lock.unlock();
      if (wake) wake_.notify_one();
      return true;
    }
    // The writer logs the drops once per interval: a line per row would flood the log.
    ++stats_.dropped;
    ++dropped_unlogged_;
    return false;
  }
  queue_.push_back(std::move(event));
  ++enqueued_;
  depth_.store(queue_.size(), std::memory_order_relaxed);
  // Wake the writer once per full batch, not per event; the timer covers the rest.
  const bool full = queue_.size() == max_batch_;
  lock.unlock();
  if (full) wake_.notify_one();
  return true;
}

// A request that finishes after stop() still gets its row; the write is
// synchronous because no writer thread is left. mutex_ is held.
bool UsageWriter::write_after_stop(UsageEvent event) {
  ++enqueued_;
  try {
    store_->append_usage(std::span<const UsageEvent>(&event, 1));
    ++committed_;
    ++stats_.written;
    ++stats_.batches;
    return true;
  } catch (const std::exception& e) {
    ++stats_.failures;
    std::fprintf(stderr, "usage writer: 1 usage row lost after stop: %s\n", e.what());
    return false;
  }
}

void UsageWriter::flush() {
  std::unique_lock lock(mutex_);
  const std::uint64_t target = enqueued_;
  if (committed_ >= target) return;
  flush_requested_ = true;
  wake_.notify_one();
  flushed_.wait(lock, [&] { return committed_ >= target || writer_done_; });
}

void UsageWriter::stop() {
  std::lock_guard stop_lock(stop_mutex_);
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

UsageWriter::Stats UsageWriter::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void UsageWriter::run() {
  std::vector<UsageEvent> batch;  // reused so its capacity survives between batches
  bool retrying = false;
  std::chrono::steady_clock::time_point retry_at;  // while retrying: the store's next try
  std::unique_lock lock(mutex_);
  while (true) {
    if (retrying) {
      // After a failure, wait a full interval even if a flush is requested, so
      // a broken disk is not hammered in a tight loop. Rows past max_queued
      // meanwhile go to the spill file, without trying the store.
      wake_.wait_until(lock, retry_at, [&] { return stopping_ || !overflow_.empty(); });
      if (!stopping_ && std::chrono::steady_clock::now() < retry_at) {
        spill_overflow(lock);
        continue;
      }
    } else {
      wake_.wait_for(lock, flush_interval_, [&] {
        return stopping_ || flush_requested_ || queue_.size() >= max_batch_ || !overflow_.empty();
      });
    }
    flush_requested_ = false;
    const bool last = stopping_;
    spill_overflow(lock);
    if (dropped_unlogged_ > 0) {
      std::fprintf(stderr, "usage writer: %llu usage rows dropped: %zu rows already waiting (the store is failing)\n",
                   static_cast<unsigned long long>(dropped_unlogged_), max_queued_);
      dropped_unlogged_ = 0;
    }
    if (queue_.empty()) {
      // The store takes rows: the spilled ones go next (all of them at stop).
      // A bounded number of batches a round, unless stopping: new rows wait meanwhile.
      for (int i = 0; !retrying && (last || (i < 64 && queue_.size() < max_batch_)) && replay_spill(lock); ++i) {
      }
      if (last) break;
      continue;
    }

    batch.swap(queue_);
    writing_ = batch.size();
    depth_.store(0, std::memory_order_relaxed);
    lock.unlock();
    const auto started = std::chrono::steady_clock::now();
    std::string error;
    try {
      store_->append_usage(batch);
    } catch (const std::exception& e) {
      error = e.what();
    }
    const auto took = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
    if (error.empty() && observer_) {
      try {
        observer_(batch.size(), took);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "usage writer: flush observer failed: %s\n", e.what());
      }
    }
    lock.lock();
    writing_ = 0;

    if (error.empty()) {
      committed_ += batch.size();
      stats_.written += batch.size();
      ++stats_.batches;
      batch.clear();
      retrying = false;
      depth_.store(queue_.size(), std::memory_order_relaxed);
      flushed_.notify_all();
      // Spilled rows follow, a few batches at a time, even while new rows keep coming.
      for (int i = 0; i < 4 && replay_spill(lock); ++i) {
      }
      continue;  // when stopping, loops until nothing is left
    }

    ++stats_.failures;
    // Keep the failed rows, oldest first, ahead of what arrived meanwhile.
    batch.insert(batch.end(), std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
    queue_.clear();
    queue_.swap(batch);
    depth_.store(queue_.size(), std::memory_order_relaxed);
    if (last) {
      if (spill_) {
        std::vector<UsageEvent> kept;
        kept.swap(queue_);
        overflow_.insert(overflow_.begin(), std::make_move_iterator(kept.begin()), std::make_move_iterator(kept.end()));
        const std::size_t n = overflow_.size();
        spill_overflow(lock);
        if (overflow_.empty()) {
          std::fprintf(stderr,
                       "usage writer: the store failed at stop (%s): %zu usage rows kept in %s for the next start\n",
                       error.c_str(), n, spill_->path().c_str());
        }
      }
      if (!queue_.empty() || !overflow_.empty()) {
        std::fprintf(stderr, "usage writer: final flush failed, %zu usage rows lost: %s\n",
                     queue_.size() + overflow_.size(), error.c_str());
      }
      queue_.clear();
      overflow_.clear();
      depth_.store(0, std::memory_order_relaxed);
      break;
    }
    std::fprintf(stderr, "usage writer: writing %zu usage rows failed, will retry: %s\n", queue_.size(), error.c_str());
    retrying = true;
    retry_at = std::chrono::steady_clock::now() + flush_interval_;
  }
  writer_done_ = true;
  flushed_.notify_all();
}

// Moves the rows past max_queued to the spill file. mutex_ is held on entry and exit.
void UsageWriter::spill_overflow(std::unique_lock<std::mutex>& lock) {
  if (overflow_.empty() || !spill_) return;
  std::vector<UsageEvent> rows;
  rows.swap(overflow_);
  lock.unlock();
  std::string error;
  try {
    spill_->append(rows);
  } catch (const std::exception& e) {
    error = e.what();
  }
  lock.lock();
  if (error.empty()) {
    stats_.spilled += rows.size();
    spill_depth_.store(spill_->pending(), std::memory_order_relaxed);
  } else {
    stats_.dropped += rows.size();
    std::fprintf(stderr, "usage writer: %zu usage rows lost: %s\n", rows.size(), error.c_str());
  }
}

// Writes one batch of spilled rows to the store; whether one was written.
// mutex_ is held on entry and exit.
bool UsageWriter::replay_spill(std::unique_lock<std::mutex>& lock) {
  if (!spill_ || spill_->pending() == 0) return false;
  lock.unlock();
  std::vector<UsageEvent> rows = spill_->peek(max_batch_);
  std::string error;
  try {
    if (!rows.empty()) store_->append_usage(rows);
    spill_->consume();
  } catch (const std::exception& e) {
    error = e.what();
  }
  lock.lock();
  spill_depth_.store(spill_->pending(), std::memory_order_relaxed);
  if (!error.empty()) {
    ++stats_.failures;
    std::fprintf(stderr, "usage writer: writing spilled usage rows failed, will retry: %s\n", error.c_str());
    return false;
  }
  stats_.replayed += rows.size();
  stats_.written += rows.size();
  ++stats_.batches;
  if (spill_->pending() == 0) std::fprintf(stderr, "usage writer: every spilled usage row is in the store\n");
  return true;
}

}  // namespace tollgate::metering
