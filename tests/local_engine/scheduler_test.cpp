#include "local_engine/scheduler.hpp"

#include <catch2/catch.hpp>

namespace le = tollgate::local_engine;

namespace {

le::ScheduledRequest request(std::uint64_t id, std::size_t prompt_tokens) {
  le::ScheduledRequest r;
  r.id = id;
  r.tokens.assign(prompt_tokens, 5);
  return r;
}

// Plays the engine's part after a step: the scheduled tokens are cached, and
// every request that sampled gets one more token.
void complete_step(le::Scheduler& s, const le::SchedulerOutput& out) {
  s.update_from_output(out);
  for (const auto& c : out.chunks) {
    if (c.samples) c.request->tokens.push_back(7);
  }
}

}  // namespace

TEST_CASE("KV blocks: allocation grows a table, runs out as a normal answer, and frees") {
  le::KvBlockAllocator blocks(4, 16);
  le::KvBlockTable a, b;
  CHECK(blocks.allocate_slots(a, 17) == 2);
  CHECK(blocks.allocate_slots(a, 32) == 0);  // still fits
  CHECK(blocks.allocate_slots(b, 33) == std::nullopt);
  CHECK(b.blocks.empty());  // nothing taken on failure
  CHECK(blocks.allocate_slots(b, 32) == 2);
  CHECK(blocks.usage() == 1.0);
  blocks.free(a);
  CHECK(blocks.free_blocks() == 2);
  CHECK(a.blocks.empty());

  le::KvCache cache(2, 4, 16, 8);
  CHECK(cache.slot(b, 0) == b.blocks[0] * 16);
  CHECK(cache.slot(b, 17) == b.blocks[1] * 16 + 1);
  // Layers, slots, keys and values are separate storage.
  cache.key(0, 5)[3] = 1.0f;
  cache.value(1, 5)[3] = 3.0f;
  cache.key(1, 5)[3] = 2.5f;
  cache.key(1, 6)[3] = 4.0f;
  CHECK(cache.key(1, 5)[3] == 2.5f);
  CHECK(cache.key(0, 5)[3] == 1.0f);
  CHECK(cache.value(1, 5)[3] == 3.0f);
  CHECK(cache.key(1, 6) - cache.key(1, 5) == 8);
}

TEST_CASE("a step spends the token budget over decodes first, then chunks of new prompts") {
  le::KvBlockAllocator blocks(100, 16);
  le::Scheduler s({/*max_num_seqs=*/4, /*max_num_batched_tokens=*/64}, blocks);
  auto a = request(1, 100);
  s.add_request(&a);
  auto out = s.schedule();
  REQUIRE(out.chunks.size() == 1);
  CHECK(out.chunks[0].count == 64);  // chunked prefill
  CHECK_FALSE(out.chunks[0].samples);
  complete_step(s, out);

  auto b = request(2, 10);
  s.add_request(&b);  // joins at the next step
  out = s.schedule();
  REQUIRE(out.chunks.size() == 2);
  CHECK(out.chunks[0].request == &a);
  CHECK(out.chunks[0].start == 64);
  CHECK(out.chunks[0].count == 36);
  CHECK(out.chunks[0].samples);
  CHECK(out.chunks[1].request == &b);
  CHECK(out.chunks[1].count == 10);
  CHECK(out.num_tokens == 46);
  complete_step(s, out);

  out = s.schedule();  // both decode one token
  REQUIRE(out.chunks.size() == 2);
  CHECK(out.chunks[0].count == 1);
  CHECK(out.chunks[1].count == 1);
  complete_step(s, out);

  s.finish(&a);  // leaves at once
  CHECK(s.num_running() == 1);
  out = s.schedule();
  REQUIRE(out.chunks.size() == 1);
  CHECK(out.chunks[0].request == &b);
}

TEST_CASE("max_num_seqs caps the running batch, the rest wait their turn in order") {
  le::KvBlockAllocator blocks(100, 16);
  le::Scheduler s({2, 512}, blocks);
  auto a = request(1, 3), b = request(2, 3), c = request(3, 3);
  s.add_request(&a);
  s.add_request(&b);
  s.add_request(&c);
  auto out = s.schedule();
  CHECK(out.chunks.size() == 2);
  CHECK(s.num_waiting() == 1);
  complete_step(s, out);
  s.finish(&b);
  out = s.schedule();
  REQUIRE(out.chunks.size() == 2);
  CHECK(out.chunks[1].request == &c);
}

TEST_CASE("out of blocks, the lowest-priority request is preempted and later recomputed") {
  le::KvBlockAllocator blocks(4, 4);  // 16 slots
  le::Scheduler s({4, 512}, blocks);
  auto a = request(1, 8), b = request(2, 7);
  s.add_request(&a);
  s.add_request(&b);
  auto out = s.schedule();
  REQUIRE(out.chunks.size() == 2);  // 2 + 2 blocks
  complete_step(s, out);
  // a now has 9 tokens and needs a third block: b (the later arrival) gives its blocks up.
  out = s.schedule();
  REQUIRE(out.chunks.size() == 1);
  CHECK(out.chunks[0].request == &a);
  REQUIRE(out.preempted.size() == 1);
  CHECK(out.preempted[0] == &b);
  CHECK(b.num_computed == 0);
  CHECK(b.blocks.blocks.empty());
  CHECK(s.num_waiting() == 1);
  complete_step(s, out);
  s.finish(&a);
  // b comes back and recomputes its prompt and the token it had generated.
  out = s.schedule();
  REQUIRE(out.chunks.size() == 1);
  CHECK(out.chunks[0].request == &b);
  CHECK(out.chunks[0].start == 0);
  CHECK(out.chunks[0].count == 8);
  CHECK(out.chunks[0].samples);
}
