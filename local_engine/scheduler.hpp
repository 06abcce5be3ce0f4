// Continuous batching in vLLM v1's shape: each request has tokens computed and
// tokens wanted; every step spends a token budget over the running requests
// (decode tokens and prefill chunks together) and admits waiting ones while
// KV blocks and max_num_seqs allow. Out of blocks, the lowest-priority running
// request is preempted (its blocks freed, recomputed later), never an error.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "local_engine/kv_cache.hpp"

namespace tollgate::local_engine {

// A request as the scheduler sees it; the engine owns it.
struct ScheduledRequest {
  std::uint64_t id = 0;              // arrival order: lower is higher priority
  std::vector<std::int32_t> tokens;  // prompt, then generated tokens
  std::int64_t num_computed = 0;     // tokens whose keys and values are cached
  KvBlockTable blocks;
  std::vector<std::uint64_t> block_hashes;  // prefix caching: of the full blocks so far
  std::int64_t num_cached_prompt = 0;       // prefix caching: prompt tokens found cached when first admitted
  std::int64_t num_preemptions = 0;

  std::int64_t num_tokens() const { return static_cast<std::int64_t>(tokens.size()); }
};

struct SchedulerConfig {
  std::int64_t max_num_seqs = 16;
  std::int64_t max_num_batched_tokens = 512;  // the per-step token budget
};

// One request's share of a step: tokens [start, start + count) are computed;
// when that reaches the last known token the step also samples the next one.
struct ScheduledChunk {
  ScheduledRequest* request = nullptr;
  std::int64_t start = 0;
  std::int64_t count = 0;
  bool samples = false;
};

struct SchedulerOutput {
  std::vector<ScheduledChunk> chunks;
  std::vector<ScheduledRequest*> preempted;  // this step, back in the waiting queue
  std::int64_t num_tokens = 0;
  bool empty() const { return chunks.empty(); }
};

class Scheduler {
 public:
  Scheduler(SchedulerConfig config, KvBlockAllocator& blocks);

  void add_request(ScheduledRequest* request);  // joins at the next step
  // The step's decision; valid until the next call (its buffers are reused,
  // so a steady-state step allocates nothing).
  const SchedulerOutput& schedule();
  // After the forward pass: the scheduled tokens are now cached.
  void update_from_output(const SchedulerOutput& output);
  // Finished or cancelled: leaves at once and frees its blocks.
  void finish(ScheduledRequest* request);

  std::size_t num_running() const { return running_.size(); }
  std::size_t num_waiting() const { return waiting_.size(); }
  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  // Prefix caching, so far: tokens of the requests admitted, and how many of
  // them were found cached (vLLM's prefix_cache_queries and _hits).
  std::int64_t prefix_queries() const { return prefix_queries_; }
  std::int64_t prefix_hits() const { return prefix_hits_; }

 private:
  void preempt(ScheduledRequest* request, SchedulerOutput& output);
  void release(ScheduledRequest* request);

  SchedulerConfig config_;
  KvBlockAllocator& blocks_;
  std::vector<ScheduledRequest*> running_;  // in priority order
  std::deque<ScheduledRequest*> waiting_;   // in priority order
  SchedulerOutput output_;
  std::int64_t prefix_queries_ = 0;
  std::int64_t prefix_hits_ = 0;
};

}  // namespace tollgate::local_engine
