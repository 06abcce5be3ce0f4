// Internal to the CPU device: the per-instruction-set kernels behind cpu_ops.hpp.
// cpu_ops.cpp owns dispatch; cpu_ops_portable.cpp and cpu_ops_avx2.cpp each
// implement the same table (cpu_ops_avx2.cpp also the avx2_vnni matmul,
// cpu_ops_avx512.cpp the avx512_vnni one, cpu_ops_amx.cpp the amx one). The
// x86 files are built only for x86-64, which defines TOLLGATE_X86_KERNELS.
#pragma once

#include <bit>
#include <cstdint>

#include "local_engine/tensor.hpp"

namespace tollgate::local_engine::cpu::kernels {

// One block's values for 16 tokens, row t for token t: the AMX kernel's A
// operand, contiguous (read with the tokens' stride it loads several times slower).
inline constexpr int kTileTokens = 16;
struct TokenTile {
  alignas(64) std::int8_t q[kTileTokens][kQuantBlock];
};

// One matmul call's operands. For Q8_0/Q4_0 weights xq holds x quantised to
// Q8_0 (n rows of cols/32 blocks), xd those blocks' scales as f32 and
// xoffset -128 * the sum of each block's values (what an unsigned + 128
// weight operand adds to a block's dot product). For the AMX kernel, xtiles
// holds the same values of each whole group of 16 tokens, group by group,
// block by block.
struct MatmulArgs {
  const Tensor* w = nullptr;
  const float* x = nullptr;
  const BlockQ8_0* xq = nullptr;
  const float* xd = nullptr;
  const std::int32_t* xoffset = nullptr;
  std::int64_t n = 0;
  float* y = nullptr;
  const TokenTile* xtiles = nullptr;
};

// Q8_0 weights 16 rows at a time, interleaved (ggml's "8x4" repack, twice as
// wide): block b of a group holds the 16 rows' scales and 8 chunks of 64
// bytes, chunk k being bytes 4k..4k+3 of rows 0..15 in turn, so one 512-bit
// vpdpbusd against a broadcast of a token's bytes 4k..4k+3 adds to all 16
// rows' sums (a 256-bit one to rows 0-7 or 8-15). Weights are stored + 128 to
// be vpdpbusd's unsigned operand. A group is its rows' bytes rearranged: the
// same size. Groups follow each other, blocks within a group; rows past the
// matrix repeat its last row.
inline constexpr int kInterleavedRows = 16;
struct InterleavedQ8Block {
  std::uint16_t scale[kInterleavedRows];  // fp16
  std::uint8_t q[8][4 * kInterleavedRows];
};
static_assert(sizeof(InterleavedQ8Block) == kInterleavedRows * sizeof(BlockQ8_0));

// Tokens processed per sweep over the weight rows: x for one sweep should
// stay in L2 while each row (or tile of rows) is applied to all of it.
inline std::int64_t token_block(std::int64_t cols) {
  constexpr std::int64_t kBytes = 512 * 1024;
  std::int64_t t = kBytes / (cols * 4);
  return t < 16 ? 16 : t;
}

// Exact for every finite half (inf and nan keep their class); branch-free so
// loops over it vectorise, unlike fp16_to_f32.
inline float half_to_float(std::uint16_t h) {
  std::uint32_t magnitude = h & 0x7fffu;
  float f = std::bit_cast<float>(magnitude << 13) * 0x1p112f;
  std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if (magnitude >= 0x7c00u) bits = 0x7f800000u | (magnitude & 0x3ffu) << 13;
  return std::bit_cast<float>(bits | (static_cast<std::uint32_t>(h & 0x8000u) << 16));
}

namespace portable {
// Computes y[t][r] for rows [row_begin, row_end) and every token t.
void matmul_rows(const MatmulArgs& args, std::int64_t row_begin, std::int64_t row_end);
float dot(const float* a, const float* b, std::int64_t n);
void axpy(float a, const float* x, float* y, std::int64_t n);
void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out);
}  // namespace portable

#if defined(TOLLGATE_X86_KERNELS)
namespace avx2 {
// Same contracts as portable::; call only where the CPU has AVX2, FMA and F16C.
// matmul_rows takes row ranges in whole groups of kInterleavedRows.
void matmul_rows(const MatmulArgs& args, std::int64_t row_begin, std::int64_t row_end);
float dot(const float* a, const float* b, std::int64_t n);
void axpy(float a, const float* x, float* y, std::int64_t n);
void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out);
// gate = silu(gate) * up with a vectorised exp (within a few ulp of std::exp).
void silu_mul(float* gate, const float* up, std::int64_t n);
// cpu::quantize_row_q8_0 in 8 lanes, the same steps and so the same bytes.
void quantize_row_q8_0(const float* x, BlockQ8_0* out, std::int64_t n);
// The group of rows r0..r0+15 of Q8_0 w, as interleave_q8_0 lays it out.
void interleave_q8_group(const Tensor& w, std::int64_t r0, InterleavedQ8Block* out);
}  // namespace avx2

namespace avx2_vnni {
// avx2::matmul_rows with Q8_0/Q4_0 block dot products on AVX-VNNI, bit-identical
// to it; call only where the CPU also has AVX-VNNI.
void matmul_rows(const MatmulArgs& args, std::int64_t row_begin, std::int64_t row_end);
}  // namespace avx2_vnni

namespace avx512_vnni {
// The Q8_0 matmul on 512-bit vpdpbusd (16 rows per vector), bit-identical to
// avx2::matmul_rows; call only where the CPU has AVX-512 F/BW/VL/VNNI and the
// OS saves zmm state, besides AVX2, FMA and F16C. Other types are the caller's
// to route (cpu_ops.cpp).
void matmul_rows_q8_0(const MatmulArgs& args, std::int64_t row_begin, std::int64_t row_end);
// The interleaved group of rows r0..r0+15: w's copy, or interleaved now into
// a per-thread buffer (valid until this thread's next call).
const InterleavedQ8Block* group_at(const Tensor& w, std::int64_t r0);
// matmul_rows_q8_0 for one group and tokens [t_begin, args.n).
void group_tokens(const MatmulArgs& args, const InterleavedQ8Block* group, std::int64_t r0, std::int64_t t_begin);
}  // namespace avx512_vnni

namespace amx {
// avx512_vnni::matmul_rows_q8_0 with the integer block sums of 16 tokens x 16
// rows as one AMX tile product, bit-identical to it; call only where the CPU
// has AMX-TILE and AMX-INT8 and the process was granted the tile state, besides
// everything avx512_vnni needs.
void matmul_rows_q8_0(const MatmulArgs& args, std::int64_t row_begin, std::int64_t row_end);
}  // namespace amx
#endif

}  // namespace tollgate::local_engine::cpu::kernels
