// Group commit for the jobs table. A job is written when it is accepted,
// when it starts and when it ends, from many coroutines at once. Each write
// still makes its own hop to the admin pool (gateway_state.hpp's
// run_blocking), but the first hop to run commits every write queued so far
// in one transaction, and the hops behind it find theirs already on disk.
// Under load that is one SQLite commit per batch instead of one per write;
// alone, a write is its own batch and costs what it did before.
#pragma once

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "metering/store.hpp"

namespace tollgate::gateway {

class JobWriter {
 public:
  explicit JobWriter(metering::Store& store) : store_(store) {}
  JobWriter(const JobWriter&) = delete;
  JobWriter& operator=(const JobWriter&) = delete;

  // Queues `write` for the next batch; returns its ticket. Any thread.
  std::uint64_t enqueue(metering::JobWrite write);

  // Blocking, on a thread that may use the store: makes sure the write with
  // `ticket` is committed (committing what is queued, unless another call
  // already did) and returns whether it was applied. A store failure fails
  // every write of its batch and is logged once.
  bool commit_through(std::uint64_t ticket);

  // Transactions committed so far (for tests and the bench).
  std::uint64_t transactions() const;

 private:
  metering::Store& store_;
  std::mutex commit_mutex_;                                            // held for a whole batch
  mutable std::mutex mutex_;                                           // the fields below
  std::vector<std::pair<std::uint64_t, metering::JobWrite>> pending_;  // tickets ascending
  std::uint64_t next_ticket_ = 1;
  std::uint64_t committed_ = 0;     // every ticket up to this one is settled
  std::set<std::uint64_t> failed_;  // settled but not applied, until their caller asks
  std::uint64_t transactions_ = 0;
};

}  // namespace tollgate::gateway
