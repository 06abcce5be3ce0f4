#include "kernels/add.cuh"

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

static __global__ void add_elements(float* y, const float* x, std::int64_t count) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) y[i] += x[i];
}

void add(float* y, const float* x, std::int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  TG_LAUNCH(add_elements, blocks_for(count, 256), 256, 0, stream)(y, x, count);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
