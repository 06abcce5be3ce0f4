#include "kernels/store_kv.cuh"

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

// One block per token.
static __global__ void store_rows(float* keys, float* values, const float* k, const float* v,
                                  const std::int64_t* slots, std::int64_t kv_dim) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t slot = slots[t];
  for (std::int64_t d = threadIdx.x; d < kv_dim; d += blockDim.x) {
    keys[slot * kv_dim + d] = k[t * kv_dim + d];
    values[slot * kv_dim + d] = v[t * kv_dim + d];
  }
}

void store_kv(float* keys, float* values, const float* k, const float* v, const std::int64_t* slots, std::int64_t n,
              std::int64_t kv_dim, cudaStream_t stream) {
  if (n <= 0) return;
  TG_LAUNCH(store_rows, static_cast<unsigned>(n), 128, 0, stream)(keys, values, k, v, slots, kv_dim);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
