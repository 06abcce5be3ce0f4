#include "kernels/silu_mul.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

static __global__ void silu_mul_elements(float* gate, const float* up, std::int64_t count) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const float g = gate[i];
  gate[i] = g / (1.0f + expf(-g)) * up[i];
}

void silu_mul(float* gate, const float* up, std::int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  TG_LAUNCH(silu_mul_elements, blocks_for(count, 256), 256, 0, stream)(gate, up, count);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
