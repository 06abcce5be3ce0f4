#include "local_engine/scheduler.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <random>
#include <set>

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

namespace {

std::vector<std::int32_t> iota_tokens(std::int32_t first, std::size_t n) {
  std::vector<std::int32_t> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = first + static_cast<std::int32_t>(i);
  return t;
}

}  // namespace

TEST_CASE("prefix caching: full computed blocks are shared by later sequences that begin the same way") {
  le::KvBlockAllocator blocks(8, 4, /*prefix_caching=*/true);
  auto a_tokens = iota_tokens(100, 10);  // blocks [100..103] [104..107] [108 109]
  le::KvBlockTable a;
  std::vector<std::uint64_t> a_hashes;
  CHECK(blocks.match_prefix(a_tokens, a, a_hashes) == 0);  // nothing cached yet
  REQUIRE(blocks.allocate_slots(a, 10) == 3);
  blocks.cache_full_blocks(a_tokens, 6, a, a_hashes);  // only one block is fully computed
  CHECK(a_hashes.size() == 1);
  blocks.cache_full_blocks(a_tokens, 10, a, a_hashes);
  CHECK(a_hashes.size() == 2);  // the partial third block is not cached

  // While a still runs, b shares its two full blocks.
  auto b_tokens = iota_tokens(100, 8);
  b_tokens.push_back(7);
  le::KvBlockTable b;
  std::vector<std::uint64_t> b_hashes;
  CHECK(blocks.match_prefix(b_tokens, b, b_hashes) == 8);
  REQUIRE(b.blocks.size() == 2);
  CHECK(b.blocks[0] == a.blocks[0]);
  CHECK(b.blocks[1] == a.blocks[1]);
  CHECK(b_hashes == a_hashes);
  CHECK(blocks.free_blocks() == 5);  // shared blocks are not taken twice

  // A sequence that differs in its second block shares only the first.
  auto c_tokens = iota_tokens(100, 12);
  c_tokens[5] = 0;
  le::KvBlockTable c;
  std::vector<std::uint64_t> c_hashes;
  CHECK(blocks.match_prefix(c_tokens, c, c_hashes) == 4);
  // Exactly the cached blocks' tokens, and never the last token: it is computed for its logits.
  le::KvBlockTable d;
  std::vector<std::uint64_t> d_hashes;
  CHECK(blocks.match_prefix(iota_tokens(100, 8), d, d_hashes) == 4);
  // Another start shares nothing, even where later blocks hold the same tokens.
  auto e_tokens = iota_tokens(104, 8);
  le::KvBlockTable e;
  std::vector<std::uint64_t> e_hashes;
  CHECK(blocks.match_prefix(e_tokens, e, e_hashes) == 0);

  // Freed, the blocks stay cached until the space is needed.
  for (auto* t : {&a, &b, &c, &d}) blocks.free(*t);
  CHECK(blocks.free_blocks() == 8);
  CHECK(blocks.usage() == 0.0);
  le::KvBlockTable again;
  std::vector<std::uint64_t> again_hashes;
  CHECK(blocks.match_prefix(b_tokens, again, again_hashes) == 8);
  blocks.free(again);
  // Taking every block evicts them; then nothing matches.
  le::KvBlockTable all;
  REQUIRE(blocks.allocate_slots(all, 32) == 8);
  blocks.free(all);
  le::KvBlockTable gone;
  std::vector<std::uint64_t> gone_hashes;
  CHECK(blocks.match_prefix(b_tokens, gone, gone_hashes) == 0);

  // Off, nothing is ever shared.
  le::KvBlockAllocator plain(8, 4);
  le::KvBlockTable p;
  std::vector<std::uint64_t> p_hashes;
  REQUIRE(plain.allocate_slots(p, 10) == 3);
  plain.cache_full_blocks(a_tokens, 10, p, p_hashes);
  CHECK(p_hashes.empty());
  le::KvBlockTable q;
  CHECK(plain.match_prefix(a_tokens, q, p_hashes) == 0);
}

TEST_CASE("prefix caching under churn: a shared block always holds the tokens asked for") {
  constexpr std::int64_t kBlock = 4;
  le::KvBlockAllocator blocks(24, kBlock, true);
  std::mt19937 random(5);
  // What the test "computed" into each block, as the forward pass would.
  std::vector<std::vector<std::int32_t>> contents(24);
  struct Seq {
    std::vector<std::int32_t> tokens;
    le::KvBlockTable table;
    std::vector<std::uint64_t> hashes;
  };
  std::vector<Seq> live;
  std::int64_t hits = 0;
  for (int op = 0; op < 3000; ++op) {
    if (live.size() < 5 && random() % 3 != 0) {
      Seq s;
      // Few distinct prefixes, so sharing is frequent.
      const std::size_t n = 2 + random() % 18;
      for (std::size_t i = 0; i < n; ++i)
        s.tokens.push_back(static_cast<std::int32_t>(i < 8 ? random() % 2 : random() % 50));
      const std::int64_t matched = blocks.match_prefix(s.tokens, s.table, s.hashes);
      REQUIRE(matched % kBlock == 0);
      REQUIRE(matched < static_cast<std::int64_t>(s.tokens.size()));
      for (std::size_t b = 0; b < s.table.blocks.size(); ++b) {
        const auto& held = contents[static_cast<std::size_t>(s.table.blocks[b])];
        REQUIRE(std::equal(held.begin(), held.end(), s.tokens.begin() + static_cast<std::ptrdiff_t>(b) * kBlock));
      }
      hits += matched;
      const auto before = s.table.blocks.size();
      if (!blocks.allocate_slots(s.table, static_cast<std::int64_t>(s.tokens.size()))) {
        blocks.free(s.table);
        continue;
      }
      for (std::size_t b = before; b < s.table.blocks.size(); ++b) {
        auto first = s.tokens.begin() + static_cast<std::ptrdiff_t>(b) * kBlock;
        auto last = s.tokens.begin() + std::min<std::ptrdiff_t>(static_cast<std::ptrdiff_t>(s.tokens.size()),
                                                                static_cast<std::ptrdiff_t>(b + 1) * kBlock);
        contents[static_cast<std::size_t>(s.table.blocks[b])].assign(first, last);
      }
      blocks.cache_full_blocks(s.tokens, static_cast<std::int64_t>(s.tokens.size()), s.table, s.hashes);
      live.push_back(std::move(s));
    } else if (!live.empty()) {
      auto at = random() % live.size();
      blocks.free(live[at].table);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(at));
    }
    // Every block is either held (once, however many share it) or free.
    std::set<std::int32_t> held;
    for (const auto& s : live) held.insert(s.table.blocks.begin(), s.table.blocks.end());
    REQUIRE(blocks.free_blocks() == 24 - static_cast<std::int64_t>(held.size()));
  }
  CHECK(hits > 100);  // the churn did share
}
