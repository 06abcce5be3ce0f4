#include "kernels/argmax.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

// (value, index) b beats a when larger, or equal at a lower index.
__device__ __forceinline__ bool beats(float bv, int bi, float av, int ai) {
  return bv > av || (bv == av && bi < ai);
}

// One block per row: each thread's best over its stride, then warps, then the block.
static __global__ void argmax_rows(const float* logits, std::int64_t cols, std::int32_t* out) {
  __shared__ float best_values[32];
  __shared__ int best_indices[32];
  const float* row = logits + blockIdx.x * cols;
  float value = -INFINITY;
  int index = static_cast<int>(cols);  // past the row: loses every tie
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if (beats(row[c], static_cast<int>(c), value, index)) {
      value = row[c];
      index = static_cast<int>(c);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, value, offset);
    const int i = __shfl_xor_sync(0xffffffffu, index, offset);
    if (beats(v, i, value, index)) {
      value = v;
      index = i;
    }
  }
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  if (lane == 0) {
    best_values[warp] = value;
    best_indices[warp] = index;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < static_cast<int>(blockDim.x / warpSize); ++w) {
    if (beats(best_values[w], best_indices[w], value, index)) {
      value = best_values[w];
      index = best_indices[w];
    }
  }
  // A row of NaN and -inf only: the first index, as the CPU's scan ends.
  out[blockIdx.x] = index < cols ? index : 0;
}

void argmax(const float* logits, std::int64_t rows, std::int64_t cols, std::int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return;
  TG_LAUNCH(argmax_rows, static_cast<unsigned>(rows), 256, 0, stream)(logits, cols, out);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
