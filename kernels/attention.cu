#include "kernels/attention.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {
namespace {
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
}  // namespace

// Block (head, token, partition): the scores of the partition's positions
// (one warp per position, lanes along head_dim), their softmax, and the
// weighted sum of the values (threads along head_dim). With one partition the
// result is final; otherwise the block leaves its unnormalised sum, its max
// and its exp-sum in the workspace for attention_combine.
static __global__ void __launch_bounds__(kThreads) attention_partition(AttentionArgs a, float scale) {
  __shared__ float query[kMaxHeadDim];
  __shared__ float scores[kAttentionPartition];
  __shared__ float scratch[32];
  const std::int64_t h = blockIdx.x, t = blockIdx.y, part = blockIdx.z;
  const std::int64_t len = static_cast<std::int64_t>(a.positions[t]) + 1;
  const std::int64_t begin = part * kAttentionPartition;
  const std::int64_t parts = attention_partitions(a.max_len);
  const std::int64_t hd = a.head_dim;
  const std::int64_t kv_dim = a.n_kv_heads * hd;
  const std::int64_t kv_offset = h / (a.n_heads / a.n_kv_heads) * hd;
  const std::int32_t* table = a.block_tables + a.table_offsets[t];
  float* partial = a.workspace + ((t * a.n_heads + h) * parts + part) * (hd + 2);
  if (begin >= len) {  // this token's context ends before the partition
    if (threadIdx.x == 0 && parts > 1) {
      partial[hd] = -INFINITY;
      partial[hd + 1] = 0.0f;
    }
    return;
  }
  const std::int64_t count = len - begin < kAttentionPartition ? len - begin : kAttentionPartition;

  for (std::int64_t d = threadIdx.x; d < hd; d += kThreads) query[d] = a.q[(t * a.n_heads + h) * hd + d] * scale;
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (std::int64_t i = warp; i < count; i += kWarps) {
    const std::int64_t p = begin + i;
    const std::int64_t slot = static_cast<std::int64_t>(table[p / a.block_size]) * a.block_size + p % a.block_size;
    const float* key = a.keys + slot * kv_dim + kv_offset;
    float dot = 0.0f;
    for (std::int64_t d = lane; d < hd; d += 32) dot += query[d] * key[d];
    dot = warp_sum(dot);
    if (lane == 0) scores[i] = dot;
  }
  __syncthreads();

  float max = -INFINITY;
  for (std::int64_t i = threadIdx.x; i < count; i += kThreads) max = fmaxf(max, scores[i]);
  max = block_max(max, scratch);
  float sum = 0.0f;
  for (std::int64_t i = threadIdx.x; i < count; i += kThreads) {
    const float e = expf(scores[i] - max);
    scores[i] = e;
    sum += e;
  }
  sum = block_sum(sum, scratch);  // its barriers also publish the exponentials

  for (std::int64_t d = threadIdx.x; d < hd; d += kThreads) {
    float acc = 0.0f;
    for (std::int64_t i = 0; i < count; ++i) {
      const std::int64_t p = begin + i;
      const std::int64_t slot = static_cast<std::int64_t>(table[p / a.block_size]) * a.block_size + p % a.block_size;
      acc += scores[i] * a.values[slot * kv_dim + kv_offset + d];
    }
    if (parts == 1) {
      a.out[(t * a.n_heads + h) * hd + d] = acc / sum;
    } else {
      partial[d] = acc;
    }
  }
  if (parts > 1 && threadIdx.x == 0) {
    partial[hd] = max;
    partial[hd + 1] = sum;
  }
}

// Block (head, token): the partitions' sums rescaled to the overall max.
static __global__ void attention_combine(AttentionArgs a) {
  const std::int64_t h = blockIdx.x, t = blockIdx.y;
  const std::int64_t hd = a.head_dim;
  const std::int64_t parts = attention_partitions(a.max_len);
  const float* partial = a.workspace + (t * a.n_heads + h) * parts * (hd + 2);
  float max = -INFINITY;
  for (std::int64_t p = 0; p < parts; ++p) max = fmaxf(max, partial[p * (hd + 2) + hd]);
  float total = 0.0f;
  for (std::int64_t p = 0; p < parts; ++p) {
    const float* part = partial + p * (hd + 2);
    if (part[hd + 1] > 0.0f) total += part[hd + 1] * expf(part[hd] - max);
  }
  for (std::int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t p = 0; p < parts; ++p) {
      const float* part = partial + p * (hd + 2);
      if (part[hd + 1] > 0.0f) acc += part[d] * expf(part[hd] - max);
    }
    a.out[(t * a.n_heads + h) * hd + d] = acc / total;
  }
}

void paged_attention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.n <= 0) return;
  const auto parts = attention_partitions(args.max_len);
  const float scale = 1.0f / sqrtf(static_cast<float>(args.head_dim));
  const dim3 grid(static_cast<unsigned>(args.n_heads), static_cast<unsigned>(args.n), static_cast<unsigned>(parts));
  TG_LAUNCH(attention_partition, grid, kThreads, 0, stream)(args, scale);
  if (parts > 1) {
    const dim3 combine_grid(static_cast<unsigned>(args.n_heads), static_cast<unsigned>(args.n));
    TG_LAUNCH(attention_combine, combine_grid, 64, 0, stream)(args);
  }
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
