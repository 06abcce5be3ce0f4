#include "kernels/rope.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

// One thread per pair of one head (query heads first, then key heads) of one
// token. The angle is computed in double, as on the CPU: pos * freq reaches
// thousands of radians, where f32 loses the fraction that matters.
static __global__ void rope_pairs(float* q, float* k, const std::int32_t* positions, std::int64_t n,
                                  std::int64_t n_heads, std::int64_t n_kv_heads, std::int64_t head_dim, double theta) {
  const std::int64_t pairs = head_dim / 2;
  const std::int64_t per_token = (n_heads + n_kv_heads) * pairs;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n * per_token) return;
  const std::int64_t t = index / per_token;
  std::int64_t head = index % per_token / pairs;
  const std::int64_t i = index % pairs;
  float* v;
  if (head < n_heads) {
    v = q + (t * n_heads + head) * head_dim;
  } else {
    head -= n_heads;
    v = k + (t * n_kv_heads + head) * head_dim;
  }
  const double freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  const double angle = static_cast<double>(positions[t]) * freq;
  const auto c = static_cast<float>(cos(angle));
  const auto s = static_cast<float>(sin(angle));
  const float a = v[2 * i], b = v[2 * i + 1];
  v[2 * i] = a * c - b * s;
  v[2 * i + 1] = a * s + b * c;
}

void rope(float* q, float* k, const std::int32_t* positions, std::int64_t n, std::int64_t n_heads,
          std::int64_t n_kv_heads, std::int64_t head_dim, float theta, cudaStream_t stream) {
  const std::int64_t total = n * (n_heads + n_kv_heads) * (head_dim / 2);
  if (total <= 0) return;
  TG_LAUNCH(rope_pairs, blocks_for(total, 256), 256, 0, stream)(q, k, positions, n, n_heads, n_kv_heads, head_dim,
                                                                static_cast<double>(theta));
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
