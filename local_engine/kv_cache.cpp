#include "local_engine/kv_cache.hpp"

#include <cassert>

namespace tollgate::local_engine {

KvBlockAllocator::KvBlockAllocator(std::int64_t num_blocks, std::int64_t block_size)
    : block_size_(block_size), total_(static_cast<std::size_t>(num_blocks)) {
  assert(num_blocks > 0 && block_size > 0);
  free_.reserve(total_);
  for (auto b = static_cast<std::int32_t>(num_blocks); b-- > 0;) free_.push_back(b);
}

std::optional<std::int64_t> KvBlockAllocator::allocate_slots(KvBlockTable& table, std::int64_t num_tokens) {
  auto have = static_cast<std::int64_t>(table.blocks.size());
  auto need = blocks_for(num_tokens) - have;
  if (need <= 0) return 0;
  if (need > free_blocks()) return std::nullopt;
  for (std::int64_t i = 0; i < need; ++i) {
    table.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return need;
}

void KvBlockAllocator::free(KvBlockTable& table) {
  for (auto b : table.blocks) free_.push_back(b);
  table.blocks.clear();
}

KvCache::KvCache(std::int64_t n_layers, std::int64_t num_blocks, std::int64_t block_size, std::int64_t kv_dim)
    : block_size_(block_size),
      slots_(num_blocks * block_size),
      kv_dim_(kv_dim),
      keys_(new float[static_cast<std::size_t>(n_layers * slots_ * kv_dim)]),
      values_(new float[static_cast<std::size_t>(n_layers * slots_ * kv_dim)]) {}

}  // namespace tollgate::local_engine
