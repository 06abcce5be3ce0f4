#include "gateway/job_writer.hpp"

#include <exception>
#include <iostream>

namespace tollgate::gateway {

std::uint64_t JobWriter::enqueue(metering::JobWrite write) {
  std::lock_guard lock(mutex_);
  const auto ticket = next_ticket_++;
  pending_.emplace_back(ticket, std::move(write));
  return ticket;
}

bool JobWriter::commit_through(std::uint64_t ticket) {
  // One batch at a time: once in, every batch before this ticket's has settled,
  // so the ticket is either settled or still queued.
  std::lock_guard one_batch(commit_mutex_);
  std::unique_lock lock(mutex_);
  if (ticket > committed_ && !pending_.empty()) {
    auto batch = std::exchange(pending_, {});
    lock.unlock();
    std::vector<metering::JobWrite> writes;
    writes.reserve(batch.size());
    for (auto& [t, w] : batch) writes.push_back(std::move(w));
    std::vector<bool> applied;
    try {
      applied = store_.write_jobs(writes);
    } catch (const std::exception& e) {
      std::cerr << "tollgate: storing " << writes.size() << " job change(s) failed: " << e.what() << "\n";
    }
    applied.resize(writes.size(), false);
    lock.lock();
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (!applied[i]) failed_.insert(batch[i].first);
    }
    committed_ = batch.back().first;
    ++transactions_;
  }
  return ticket <= committed_ && failed_.erase(ticket) == 0;
}

std::uint64_t JobWriter::transactions() const {
  std::lock_guard lock(mutex_);
  return transactions_;
}

}  // namespace tollgate::gateway
