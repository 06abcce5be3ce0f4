// The paged KV cache: keys and values in fixed-size blocks of token slots, a
// block table per sequence mapping its positions to blocks (vLLM's layout).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "local_engine/device_buffer.hpp"

namespace tollgate::local_engine {

// The blocks one sequence holds, in position order: position p lives in
// blocks[p / block_size], slot p % block_size.
struct KvBlockTable {
  std::vector<std::int32_t> blocks;
};

// Hands out blocks; running out is a normal answer, not an error.
//
// With prefix caching (vLLM's automatic prefix caching), every full block a
// sequence has computed is known by a hash of its tokens and of the blocks
// before it. A new sequence whose tokens begin the same way shares those
// blocks (read-only, counted by references) instead of computing them again.
// A freed block keeps its contents until it is needed: free blocks that hold
// nothing are handed out first, then cached ones, least recently used first.
class KvBlockAllocator {
 public:
  KvBlockAllocator(std::int64_t num_blocks, std::int64_t block_size, bool prefix_caching = false);

  // Grows `table` to hold `num_tokens` positions. Returns the number of blocks
  // added, or nullopt (and takes nothing) when too few are free.
  std::optional<std::int64_t> allocate_slots(KvBlockTable& table, std::int64_t num_tokens);
  // Releases the table's blocks (a shared block stays with its other users).
  void free(KvBlockTable& table);

  // Prefix caching, for a sequence with no blocks yet: appends the cached
  // blocks that hold the longest run of its leading full blocks, and their
  // hashes, and returns the tokens they hold (always fewer than
  // tokens.size(): the last token is computed, for its logits). 0 when off.
  std::int64_t match_prefix(const std::vector<std::int32_t>& tokens, KvBlockTable& table,
                            std::vector<std::uint64_t>& hashes);
  // Makes the table's full blocks among the first `num_computed` tokens
  // findable by later sequences; `hashes` holds those already known.
  void cache_full_blocks(const std::vector<std::int32_t>& tokens, std::int64_t num_computed, const KvBlockTable& table,
                         std::vector<std::uint64_t>& hashes);

  std::int64_t block_size() const { return block_size_; }
  std::int64_t num_blocks() const { return static_cast<std::int64_t>(total_); }
  std::int64_t free_blocks() const { return static_cast<std::int64_t>(empty_.size() + lru_count_); }
  double usage() const { return total_ == 0 ? 0.0 : 1.0 - static_cast<double>(free_blocks()) / total_; }
  std::int64_t blocks_for(std::int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  bool prefix_caching() const { return prefix_caching_; }

 private:
  static constexpr std::int32_t kNone = -1;
  struct Block {
    std::int32_t refs = 0;
    bool cached = false;  // findable by `hash`
    std::uint64_t hash = 0;
    std::uint64_t parent = 0;                         // the hash of the block before it in its sequence
    std::int32_t lru_prev = kNone, lru_next = kNone;  // while free and cached
  };

  std::int32_t take_block();
  void lru_push(std::int32_t b);
  void lru_remove(std::int32_t b);
  void uncache(std::int32_t b);
  // Hash table (open addressing, linear probing, backward-shift deletion):
  // hash -> block, sized once so nothing allocates after construction.
  std::int32_t find(std::uint64_t hash) const;
  void insert(std::uint64_t hash, std::int32_t block);
  void erase(std::uint64_t hash);
  const std::int32_t* block_tokens(std::int32_t b) const { return &tokens_[static_cast<std::size_t>(b * block_size_)]; }

  std::int64_t block_size_;
  std::size_t total_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<std::int32_t> tokens_;                  // per cached block: its tokens, to confirm a hash match
  std::vector<std::int32_t> empty_;                   // free blocks holding nothing cached: a stack
  std::int32_t lru_head_ = kNone, lru_tail_ = kNone;  // free cached blocks, least recently used first
  std::size_t lru_count_ = 0;
  std::vector<std::uint64_t> table_keys_;  // 0: empty slot
  std::vector<std::int32_t> table_blocks_;
};

// The storage: per layer, one key and one value vector (kv_dim floats) per
// slot, in memory of the device that computes on it (`allocate`, e.g.
// Device::allocate; host memory by default). Not zeroed: a slot is read only
// after its position was written, and untouched host pages cost no memory.
class KvCache {
 public:
  using Allocate = std::function<DeviceBuffer(std::size_t bytes)>;
  KvCache(std::int64_t n_layers, std::int64_t num_blocks, std::int64_t block_size, std::int64_t kv_dim,
          const Allocate& allocate = host_buffer);

  // A physical slot index: block * block_size + offset.
  std::int64_t slot(const KvBlockTable& table, std::int64_t pos) const {
    return static_cast<std::int64_t>(table.blocks[static_cast<std::size_t>(pos / block_size_)]) * block_size_ +
           pos % block_size_;
  }
  // Addresses in the device's memory: dereference them only on the host device.
  float* key(std::int64_t layer, std::int64_t slot) { return keys_.as<float>() + index(layer, slot); }
  float* value(std::int64_t layer, std::int64_t slot) { return values_.as<float>() + index(layer, slot); }
  const float* key(std::int64_t layer, std::int64_t slot) const { return keys_.as<float>() + index(layer, slot); }
  const float* value(std::int64_t layer, std::int64_t slot) const { return values_.as<float>() + index(layer, slot); }
  std::int64_t block_size() const { return block_size_; }
  std::int64_t kv_dim() const { return kv_dim_; }

  // Bytes one block takes over all layers (keys and values).
  static std::int64_t block_bytes(std::int64_t n_layers, std::int64_t block_size, std::int64_t kv_dim) {
    return 2 * n_layers * block_size * kv_dim * static_cast<std::int64_t>(sizeof(float));
  }

 private:
  std::size_t index(std::int64_t layer, std::int64_t slot) const {
    return static_cast<std::size_t>((layer * slots_ + slot) * kv_dim_);
  }
  std::int64_t block_size_;
  std::int64_t slots_;
  std::int64_t kv_dim_;
  DeviceBuffer keys_;
  DeviceBuffer values_;
};

}  // namespace tollgate::local_engine
