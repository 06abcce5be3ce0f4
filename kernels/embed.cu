#include "kernels/embed.cuh"

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {

// One block per token, its threads along the row.
static __global__ void embed_rows(const void* table, Type type, std::int64_t cols, const std::int32_t* ids,
                                  float* out) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t row = ids[t];
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[t * cols + c] = load_element(table, type, row, cols, c);
}

void embed(const void* table, Type type, std::int64_t cols, const std::int32_t* ids, std::int64_t n, float* out,
           cudaStream_t stream) {
  if (n <= 0) return;
  TG_LAUNCH(embed_rows, static_cast<unsigned>(n), 256, 0, stream)(table, type, cols, ids, out);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
