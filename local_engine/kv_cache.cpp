#include "local_engine/kv_cache.hpp"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cstdlib>
#include <new>

namespace tollgate::local_engine {
namespace {

constexpr std::uint64_t kRootHash = 0x6a09e667f3bcc908ull;  // the "parent" of a sequence's first block

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t block_hash(std::uint64_t parent, const std::int32_t* tokens, std::int64_t n) {
  std::uint64_t h = mix(parent);
  for (std::int64_t i = 0; i < n; ++i) h = mix(h ^ static_cast<std::uint32_t>(tokens[i]));
  return h == 0 ? 1 : h;  // 0 marks an empty slot of the table
}

}  // namespace

KvBlockAllocator::KvBlockAllocator(std::int64_t num_blocks, std::int64_t block_size, bool prefix_caching)
    : block_size_(block_size),
      total_(static_cast<std::size_t>(num_blocks)),
      prefix_caching_(prefix_caching),
      blocks_(total_) {
  assert(num_blocks > 0 && block_size > 0);
  empty_.reserve(total_);
  for (auto b = static_cast<std::int32_t>(num_blocks); b-- > 0;) empty_.push_back(b);
  if (prefix_caching_) {
    tokens_.resize(total_ * static_cast<std::size_t>(block_size));
    const std::size_t slots = std::bit_ceil(std::max<std::size_t>(16, 2 * total_));
    table_keys_.assign(slots, 0);
    table_blocks_.assign(slots, kNone);
  }
}

std::int32_t KvBlockAllocator::take_block() {
  std::int32_t b;
  if (!empty_.empty()) {
    b = empty_.back();
    empty_.pop_back();
  } else {
    b = lru_head_;  // the least recently used cached block gives up its contents
    assert(b != kNone);
    lru_remove(b);
    uncache(b);
  }
  blocks_[static_cast<std::size_t>(b)].refs = 1;
  return b;
}

std::optional<std::int64_t> KvBlockAllocator::allocate_slots(KvBlockTable& table, std::int64_t num_tokens) {
  auto have = static_cast<std::int64_t>(table.blocks.size());
  auto need = blocks_for(num_tokens) - have;
  if (need <= 0) return 0;
  if (need > free_blocks()) return std::nullopt;
  for (std::int64_t i = 0; i < need; ++i) table.blocks.push_back(take_block());
  return need;
}

void KvBlockAllocator::free(KvBlockTable& table) {
  // Last block first: a sequence's tail is the least likely to be shared, so
  // it is the first to be evicted.
  for (auto it = table.blocks.rbegin(); it != table.blocks.rend(); ++it) {
    Block& block = blocks_[static_cast<std::size_t>(*it)];
    assert(block.refs > 0);
    if (--block.refs > 0) continue;
    if (block.cached) {
      lru_push(*it);
    } else {
      empty_.push_back(*it);
    }
  }
  table.blocks.clear();
}

std::int64_t KvBlockAllocator::match_prefix(const std::vector<std::int32_t>& tokens, KvBlockTable& table,
                                            std::vector<std::uint64_t>& hashes) {
  if (!prefix_caching_ || !table.blocks.empty() || tokens.empty()) return 0;
  assert(hashes.empty());
  // Whole blocks only, and never the last token: it must be computed for its logits.
  const auto full = (static_cast<std::int64_t>(tokens.size()) - 1) / block_size_;
  std::uint64_t parent = kRootHash;
  for (std::int64_t i = 0; i < full; ++i) {
    const std::int32_t* first = tokens.data() + i * block_size_;
    const std::uint64_t h = block_hash(parent, first, block_size_);
    const std::int32_t b = find(h);
    if (b == kNone) break;
    Block& block = blocks_[static_cast<std::size_t>(b)];
    // A hash is not proof: the block must hold these very tokens after the same blocks.
    if (block.parent != parent || !std::equal(first, first + block_size_, block_tokens(b))) break;
    if (block.refs++ == 0) lru_remove(b);
    table.blocks.push_back(b);
    hashes.push_back(h);
    parent = h;
  }
  return static_cast<std::int64_t>(table.blocks.size()) * block_size_;
}

void KvBlockAllocator::cache_full_blocks(const std::vector<std::int32_t>& tokens, std::int64_t num_computed,
                                         const KvBlockTable& table, std::vector<std::uint64_t>& hashes) {
  if (!prefix_caching_) return;
  for (auto i = static_cast<std::int64_t>(hashes.size());
       (i + 1) * block_size_ <= num_computed && i < static_cast<std::int64_t>(table.blocks.size()); ++i) {
    const std::uint64_t parent = i == 0 ? kRootHash : hashes[static_cast<std::size_t>(i - 1)];
    const std::int32_t* first = tokens.data() + i * block_size_;
    const std::uint64_t h = block_hash(parent, first, block_size_);
    hashes.push_back(h);
    const std::int32_t b = table.blocks[static_cast<std::size_t>(i)];
    Block& block = blocks_[static_cast<std::size_t>(b)];
    if (block.cached || find(h) != kNone) continue;  // another block already holds these tokens
    block.cached = true;
    block.hash = h;
    block.parent = parent;
    std::copy(first, first + block_size_, &tokens_[static_cast<std::size_t>(b * block_size_)]);
    insert(h, b);
  }
}

void KvBlockAllocator::lru_push(std::int32_t b) {
  Block& block = blocks_[static_cast<std::size_t>(b)];
  block.lru_prev = lru_tail_;
  block.lru_next = kNone;
  if (lru_tail_ != kNone) {
    blocks_[static_cast<std::size_t>(lru_tail_)].lru_next = b;
  } else {
    lru_head_ = b;
  }
  lru_tail_ = b;
  ++lru_count_;
}

void KvBlockAllocator::lru_remove(std::int32_t b) {
  Block& block = blocks_[static_cast<std::size_t>(b)];
  if (block.lru_prev != kNone) {
    blocks_[static_cast<std::size_t>(block.lru_prev)].lru_next = block.lru_next;
  } else {
    lru_head_ = block.lru_next;
  }
  if (block.lru_next != kNone) {
    blocks_[static_cast<std::size_t>(block.lru_next)].lru_prev = block.lru_prev;
  } else {
    lru_tail_ = block.lru_prev;
  }
  block.lru_prev = block.lru_next = kNone;
  --lru_count_;
}

void KvBlockAllocator::uncache(std::int32_t b) {
  Block& block = blocks_[static_cast<std::size_t>(b)];
  if (!block.cached) return;
  erase(block.hash);
  block.cached = false;
}

std::int32_t KvBlockAllocator::find(std::uint64_t hash) const {
  if (table_keys_.empty()) return kNone;
  const std::size_t mask = table_keys_.size() - 1;
  for (std::size_t i = hash & mask; table_keys_[i] != 0; i = (i + 1) & mask) {
    if (table_keys_[i] == hash) return table_blocks_[i];
  }
  return kNone;
}

void KvBlockAllocator::insert(std::uint64_t hash, std::int32_t block) {
  const std::size_t mask = table_keys_.size() - 1;
  std::size_t i = hash & mask;
  while (table_keys_[i] != 0) i = (i + 1) & mask;  // at most total_ of 2 * total_ slots are used
  table_keys_[i] = hash;
  table_blocks_[i] = block;
}

void KvBlockAllocator::erase(std::uint64_t hash) {
  const std::size_t mask = table_keys_.size() - 1;
  std::size_t i = hash & mask;
  while (table_keys_[i] != hash) {
    assert(table_keys_[i] != 0);
    i = (i + 1) & mask;
  }
  // Backward shift: move later entries of the run into the hole when their
  // home slot does not lie in the cyclic range (hole, entry].
  for (std::size_t j = (i + 1) & mask; table_keys_[j] != 0; j = (j + 1) & mask) {
    const std::size_t home = table_keys_[j] & mask;
    const bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
    if (stays) continue;
    table_keys_[i] = table_keys_[j];
    table_blocks_[i] = table_blocks_[j];
    i = j;
  }
  table_keys_[i] = 0;
  table_blocks_[i] = kNone;
}

KvCache::KvCache(std::int64_t n_layers, std::int64_t num_blocks, std::int64_t block_size, std::int64_t kv_dim,
                 const Allocate& allocate)
    : block_size_(block_size),
      slots_(num_blocks * block_size),
      kv_dim_(kv_dim),
      keys_(allocate(static_cast<std::size_t>(n_layers * slots_ * kv_dim) * sizeof(float))),
      values_(allocate(static_cast<std::size_t>(n_layers * slots_ * kv_dim) * sizeof(float))) {}

DeviceBuffer host_buffer(std::size_t bytes) {
  constexpr std::size_t kAlign = 64;
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded);
  if (p == nullptr) throw std::bad_alloc();
  return {p, bytes, [](void* q) { std::free(q); }};
}

}  // namespace tollgate::local_engine
