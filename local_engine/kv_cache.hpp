// The paged KV cache: keys and values in fixed-size blocks of token slots, a
// block table per sequence mapping its positions to blocks (vLLM's layout).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace tollgate::local_engine {

// The blocks one sequence holds, in position order: position p lives in
// blocks[p / block_size], slot p % block_size.
struct KvBlockTable {
  std::vector<std::int32_t> blocks;
};

// Hands out blocks; running out is a normal answer, not an error.
class KvBlockAllocator {
 public:
  KvBlockAllocator(std::int64_t num_blocks, std::int64_t block_size);

  // Grows `table` to hold `num_tokens` positions. Returns the number of blocks
  // added, or nullopt (and takes nothing) when too few are free.
  std::optional<std::int64_t> allocate_slots(KvBlockTable& table, std::int64_t num_tokens);
  void free(KvBlockTable& table);

  std::int64_t block_size() const { return block_size_; }
  std::int64_t num_blocks() const { return static_cast<std::int64_t>(total_); }
  std::int64_t free_blocks() const { return static_cast<std::int64_t>(free_.size()); }
  double usage() const { return total_ == 0 ? 0.0 : 1.0 - static_cast<double>(free_.size()) / total_; }
  std::int64_t blocks_for(std::int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

 private:
  std::int64_t block_size_;
  std::size_t total_;
  std::vector<std::int32_t> free_;  // a stack: recently freed blocks are reused first
};

// The storage: per layer, one key and one value vector (kv_dim floats) per slot.
class KvCache {
 public:
  KvCache(std::int64_t n_layers, std::int64_t num_blocks, std::int64_t block_size, std::int64_t kv_dim);

  // A physical slot index: block * block_size + offset.
  std::int64_t slot(const KvBlockTable& table, std::int64_t pos) const {
    return static_cast<std::int64_t>(table.blocks[static_cast<std::size_t>(pos / block_size_)]) * block_size_ +
           pos % block_size_;
  }
  float* key(std::int64_t layer, std::int64_t slot) { return &keys_[index(layer, slot)]; }
  float* value(std::int64_t layer, std::int64_t slot) { return &values_[index(layer, slot)]; }
  const float* key(std::int64_t layer, std::int64_t slot) const { return &keys_[index(layer, slot)]; }
  const float* value(std::int64_t layer, std::int64_t slot) const { return &values_[index(layer, slot)]; }
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
  // Not zeroed: a slot is read only after its position was written, and
  // untouched pages cost no memory.
  std::unique_ptr<float[]> keys_;
  std::unique_ptr<float[]> values_;
};

}  // namespace tollgate::local_engine
