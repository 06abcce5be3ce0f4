// The seam between the forward pass and the hardware (ggml's backend split):
// a small set of ops over activations the device owns. The CPU device is the
// reference every other device is tested against.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "local_engine/kv_cache.hpp"
#include "local_engine/tensor.hpp"

namespace tollgate::local_engine {

// One token's view of the cache for attention: its position and its sequence's blocks.
struct AttentionToken {
  std::int64_t pos = 0;
  const KvBlockTable* table = nullptr;
};

struct AttentionShape {
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;
  std::int64_t head_dim = 0;
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  // Whether matmul takes weights of this type (asked before loading, not failed late).
  virtual bool supports(DType weight_type) const = 0;

  // y (n x w.rows) = x (n x w.cols) · Wᵀ
  virtual void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) = 0;
  // out (n x table.cols) = rows `tokens` of `table`
  virtual void embed(const Tensor& table, std::span<const std::int32_t> tokens, float* out) = 0;
  // n rows of weight.cols each
  virtual void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) = 0;
  // q (n x n_heads*head_dim) and k (n x n_kv_heads*head_dim), each token at its own position
  virtual void rope(float* q, float* k, std::span<const std::int64_t> positions, const AttentionShape& shape,
                    float theta) = 0;
  // Writes n keys and values (kv_dim each) to their slots.
  virtual void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v,
                        std::span<const std::int64_t> slots) = 0;
  // Causal attention of each token over its sequence's positions 0..pos.
  virtual void attention(const KvCache& cache, std::int64_t layer, const float* q,
                         std::span<const AttentionToken> tokens, const AttentionShape& shape, float* out) = 0;
  virtual void silu_mul(float* gate, const float* up, std::int64_t count) = 0;
  virtual void add(float* y, const float* x, std::int64_t count) = 0;
};

// threads <= 0: one per hardware thread.
std::unique_ptr<Device> make_cpu_device(int threads = 0);

}  // namespace tollgate::local_engine
