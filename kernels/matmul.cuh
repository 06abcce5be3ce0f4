// y (n x rows) = x (n x cols) · Wᵀ for W of any Type, without dequantising W:
// F32/F16/BF16 rows are read as they are; for Q8_0/Q4_0, x is first
// quantised to Q8_0 per row (as on the CPU) and blocks multiply with int8 dot
// products (__dp4a). One warp per weight row, applied to up to kMatmulTokens
// tokens at a time, so each weight row is read once per group of tokens.
// The CUDA device sends batches of kGemmMinTokens or more to gemm.cuh
// (cuBLAS) instead, and these too when cuBLAS is not installed.
#pragma once
#include "kernels/types.hpp"

namespace tollgate::kernels {

inline constexpr int kMatmulTokens = 8;

struct MatmulArgs {
  const void* w = nullptr;
  Type type = Type::f32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;  // a multiple of 32 for Q8_0/Q4_0
  const float* x = nullptr;
  std::int64_t n = 0;
  float* y = nullptr;
  BlockQ8_0* xq = nullptr;  // Q8_0/Q4_0 only: matmul_workspace_bytes of scratch
};

constexpr std::size_t matmul_workspace_bytes(Type type, std::int64_t n, std::int64_t cols) {
  return type == Type::q8_0 || type == Type::q4_0 ? static_cast<std::size_t>(n) * row_bytes(Type::q8_0, cols) : 0;
}

// x (n rows of cols) quantised to Q8_0, rounding as the CPU's quantize_row_q8_0.
TG_KERNEL_API(void quantize_q8_0(const float* x, std::int64_t n, std::int64_t cols, BlockQ8_0* out,
                                 cudaStream_t stream))
TG_KERNEL_API(void matmul(const MatmulArgs& args, cudaStream_t stream))

}  // namespace tollgate::kernels
