#include "local_engine/scheduler.hpp"

#include <algorithm>
#include <cassert>

namespace tollgate::local_engine {

Scheduler::Scheduler(SchedulerConfig config, KvBlockAllocator& blocks) : config_(config), blocks_(blocks) {}

void Scheduler::add_request(ScheduledRequest* request) { waiting_.push_back(request); }

void Scheduler::release(ScheduledRequest* request) {
  blocks_.free(request->blocks);
  request->block_hashes.clear();
  request->num_computed = 0;
}

void Scheduler::preempt(ScheduledRequest* request, SchedulerOutput& output) {
  release(request);
  ++request->num_preemptions;
  std::erase(running_, request);
  // Back to the waiting queue at its priority's place, ahead of later arrivals.
  auto at = std::find_if(waiting_.begin(), waiting_.end(), [&](auto* w) { return w->id > request->id; });
  waiting_.insert(at, request);
  output.preempted.push_back(request);
}

const SchedulerOutput& Scheduler::schedule() {
  SchedulerOutput& output = output_;
  output.chunks.clear();
  output.preempted.clear();
  std::int64_t budget = config_.max_num_batched_tokens;

  // Running requests first, highest priority first.
  for (std::size_t i = 0; i < running_.size() && budget > 0;) {
    ScheduledRequest* r = running_[i];
    std::int64_t count = std::min(r->num_tokens() - r->num_computed, budget);
    assert(count > 0);
    bool placed = false;
    while (!placed) {
      if (blocks_.allocate_slots(r->blocks, r->num_computed + count)) {
        placed = true;
        break;
      }
      // Out of blocks: the lowest-priority running request gives its back.
      ScheduledRequest* victim = running_.back();
      std::erase_if(output.chunks, [&](const ScheduledChunk& c) { return c.request == victim; });
      preempt(victim, output);
      if (victim == r) break;
    }
    if (!placed) break;  // r itself was the lowest priority; nothing after it runs
    output.chunks.push_back({r, r->num_computed, count, r->num_computed + count == r->num_tokens()});
    budget -= count;
    ++i;
  }
  // Recount: preemption may have dropped chunks after they were budgeted.
  budget = config_.max_num_batched_tokens;
  for (const auto& c : output.chunks) budget -= c.count;

  // Then waiting requests, in arrival order, while they fit. A request
  // preempted in this very step waits for the next one.
  while (!waiting_.empty() && budget > 0 && static_cast<std::int64_t>(running_.size()) < config_.max_num_seqs) {
    ScheduledRequest* r = waiting_.front();
    if (std::find(output.preempted.begin(), output.preempted.end(), r) != output.preempted.end()) break;
    // What an earlier sequence already computed of its tokens is shared, not recomputed.
    const std::int64_t cached =
        r->blocks.blocks.empty() ? blocks_.match_prefix(r->tokens, r->blocks, r->block_hashes) : 0;
    r->num_computed += cached;
    std::int64_t count = std::min(r->num_tokens() - r->num_computed, budget);
    if (!blocks_.allocate_slots(r->blocks, r->num_computed + count)) {
      if (cached > 0) release(r);  // waits with nothing held, and matches again next time
      break;
    }
    if (blocks_.prefix_caching()) {
      prefix_queries_ += r->num_tokens();
      prefix_hits_ += cached;
      if (r->num_preemptions == 0) r->num_cached_prompt = cached;
    }
    waiting_.pop_front();
    running_.push_back(r);
    output.chunks.push_back({r, r->num_computed, count, r->num_computed + count == r->num_tokens()});
    budget -= count;
  }
  output.num_tokens = config_.max_num_batched_tokens - budget;
  return output;
}

void Scheduler::update_from_output(const SchedulerOutput& output) {
  for (const auto& c : output.chunks) {
    ScheduledRequest& r = *c.request;
    r.num_computed = c.start + c.count;
    blocks_.cache_full_blocks(r.tokens, r.num_computed, r.blocks, r.block_hashes);
  }
}

void Scheduler::finish(ScheduledRequest* request) {
  release(request);
  std::erase(running_, request);
  std::erase(waiting_, request);
}

}  // namespace tollgate::local_engine
