// What host code needs to call the kernels: element types, quantised blocks,
// the stream type, and TG_KERNEL_API, which declares a launcher for both
// builds of the kernels (tollgate::kernels::cuda by nvcc, ::emu by the host
// compiler through the SIMT emulation). Includes no CUDA header.
#pragma once

#include <cstddef>
#include <cstdint>

// The CUDA runtime's own spelling, so this and cuda_runtime.h agree.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

// Declares `decl` in tollgate::kernels::cuda and tollgate::kernels::emu; use
// inside namespace tollgate::kernels.
#define TG_KERNEL_API(...) \
  namespace cuda {         \
  __VA_ARGS__;             \
  }                        \
  namespace emu {          \
  __VA_ARGS__;             \
  }

namespace tollgate::kernels {

// Weight and table element types, in local_engine's DType order.
enum class Type : int { f32 = 0, f16 = 1, bf16 = 2, q8_0 = 3, q4_0 = 4 };

inline constexpr int kQuantBlock = 32;
// ggml's blocks: an fp16 scale and 32 values (Q8_0: int8; Q4_0: 16 bytes of
// nibbles, the low ones values 0..15, the high ones 16..31, each q - 8).
struct BlockQ8_0 {
  std::uint16_t scale;
  std::int8_t q[kQuantBlock];
};
struct BlockQ4_0 {
  std::uint16_t scale;
  std::uint8_t q[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18);

// Bytes one row of `cols` elements of `type` takes.
constexpr std::size_t row_bytes(Type type, std::int64_t cols) {
  switch (type) {
    case Type::f32:
      return static_cast<std::size_t>(cols) * 4;
    case Type::f16:
    case Type::bf16:
      return static_cast<std::size_t>(cols) * 2;
    case Type::q8_0:
      return static_cast<std::size_t>(cols / kQuantBlock) * sizeof(BlockQ8_0);
    case Type::q4_0:
      return static_cast<std::size_t>(cols / kQuantBlock) * sizeof(BlockQ4_0);
  }
  return 0;
}

// Ceiling division, for grid sizes.
constexpr unsigned blocks_for(long long count, long long per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

}  // namespace tollgate::kernels
