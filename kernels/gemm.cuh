// Prefill-sized matmuls, ggml-cuda's way: y (n x rows) = x (n x cols) · Wᵀ
// by cuBLAS (cublasGemmEx, F32 accumulation). F32 weights multiply as they
// are (an F32 GEMM); every other type is dequantised to F16 a tile of rows at
// a time (never the whole matrix at once) and x is converted to F16 once.
//
// In the SIMT emulation (tollgate::kernels::emu) the dequantising kernels run
// emulated and the cuBLAS call is replaced by a reference GEMM on the host
// over the same F16/F32 inputs with F32 accumulation.
#pragma once

#include "kernels/types.hpp"

namespace tollgate::kernels {

// From this many tokens a step, the device's matmul takes this path.
inline constexpr int kGemmMinTokens = 32;
// A dequantised tile holds at most this many bytes of F16.
inline constexpr std::int64_t kGemmTileBytes = 32ll << 20;

constexpr std::int64_t gemm_tile_rows(std::int64_t rows, std::int64_t cols) {
  const std::int64_t fit = kGemmTileBytes / (cols * 2);
  return fit < 1 ? 1 : (fit < rows ? fit : rows);
}

struct GemmArgs {
  const void* w = nullptr;
  Type type = Type::f32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  const float* x = nullptr;
  std::int64_t n = 0;
  float* y = nullptr;
  void* workspace = nullptr;  // gemm_workspace_bytes
};

constexpr std::size_t gemm_workspace_bytes(Type type, std::int64_t n, std::int64_t rows, std::int64_t cols) {
  return type == Type::f32 ? 0 : static_cast<std::size_t>((n + gemm_tile_rows(rows, cols)) * cols * 2);
}

// out (rows x cols of F16 bits) = rows [first, first + rows) of `w` (any Type) dequantised.
TG_KERNEL_API(void to_half(const void* w, Type type, std::int64_t first, std::int64_t rows, std::int64_t cols,
                           std::uint16_t* out, cudaStream_t stream))
// Whether gemm() can run: cuBLAS (libcublas.so.13 or .12, opened at run time)
// was found; always true in the emulation.
TG_KERNEL_API(bool gemm_available())
TG_KERNEL_API(void gemm(const GemmArgs& args, cudaStream_t stream))

}  // namespace tollgate::kernels
