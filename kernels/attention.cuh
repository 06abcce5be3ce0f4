// Paged attention over block tables with grouped-query heads (vLLM's
// PagedAttention, split flash-decoding style).
//
// Token t (n of them: decode tokens and prefill-chunk tokens alike) attends
// causally to its sequence's positions 0..positions[t], whose keys and values
// are already in the cache: position p lives in slot
// block_tables[table_offsets[t] + p / block_size] * block_size + p % block_size
// of `keys`/`values` (one layer's storage, kv_dim = n_kv_heads * head_dim
// floats a slot). q is n x n_heads*head_dim; out the same. Query head h reads
// key/value head h / (n_heads / n_kv_heads).
//
// A token's context is split into partitions of kAttentionPartition
// positions, each computed by its own block; a second pass combines them.
// `workspace` holds attention_workspace_floats(...) floats.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {

inline constexpr int kAttentionPartition = 256;
inline constexpr int kMaxHeadDim = 256;

struct AttentionArgs {
  const float* q = nullptr;
  const float* keys = nullptr;
  const float* values = nullptr;
  const std::int32_t* block_tables = nullptr;
  const std::int32_t* table_offsets = nullptr;
  const std::int32_t* positions = nullptr;
  std::int64_t n = 0;
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;
  std::int64_t head_dim = 0;  // even, at most kMaxHeadDim
  std::int64_t block_size = 0;
  std::int64_t max_len = 0;  // at least every positions[t] + 1
  float* out = nullptr;
  float* workspace = nullptr;
};

constexpr std::int64_t attention_partitions(std::int64_t max_len) {
  return (max_len + kAttentionPartition - 1) / kAttentionPartition;
}
constexpr std::size_t attention_workspace_floats(std::int64_t n, std::int64_t n_heads, std::int64_t head_dim,
                                                 std::int64_t max_len) {
  const auto parts = attention_partitions(max_len);
  return parts <= 1 ? 0 : static_cast<std::size_t>(n * n_heads * parts * (head_dim + 2));
}

TG_KERNEL_API(void paged_attention(const AttentionArgs& args, cudaStream_t stream))

}  // namespace tollgate::kernels
