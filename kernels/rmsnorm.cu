#include "kernels/rmsnorm.cuh"

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

// One block per row: a block-wide sum of squares, then the scaled row.
static __global__ void rmsnorm_rows(const float* x, const float* weight, std::int64_t dim, float eps, float* out) {
  __shared__ float scratch[32];
  const float* row = x + blockIdx.x * dim;
  float sum = 0.0f;
  for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) sum += row[c] * row[c];
  sum = block_sum(sum, scratch);
  const float inv = rsqrtf(sum / static_cast<float>(dim) + eps);
  for (std::int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[blockIdx.x * dim + c] = row[c] * inv * weight[c];
}

void rmsnorm(const float* x, const float* weight, std::int64_t n, std::int64_t dim, float eps, float* out,
             cudaStream_t stream) {
  if (n <= 0) return;
  const int threads = dim >= 1024 ? 256 : dim >= 256 ? 128 : 32;
  TG_LAUNCH(rmsnorm_rows, static_cast<unsigned>(n), threads, 0, stream)(x, weight, dim, eps, out);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
