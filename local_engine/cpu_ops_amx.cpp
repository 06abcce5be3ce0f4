// The Q8_0 matmul on AMX: per interleaved block, one tile product gives the
// exact integer sums of 16 tokens x 16 rows, C[t][r] = sum_k x_t[k] * (w_r[k] +
// 128). The interleaved block's 8 chunks are already the B operand's layout
// (row k = bytes 4k..4k+3 of each of the 16 rows); the tokens' values are
// the A operand, copied per call into contiguous TokenTiles (cpu_ops.cpp).
// The f32 steps after the sums are avx512_vnni's, so results are
// bit-identical to it (and to the AVX2 kernels). Compiled per function with
// target attributes, like the other kernel files.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "local_engine/cpu_kernels.hpp"
#include "local_engine/cpu_targets.hpp"

namespace tollgate::local_engine::cpu::kernels::amx {

namespace {

constexpr int kTokens = kTileTokens;
constexpr std::int64_t kPrefetchBytes = 4096;
// Tile registers 3s + 0, 1, 2 of set s: C (sums, 16 tokens x 16 int32), A
// (16 tokens x 32 bytes), B (8 chunks x 64 bytes); two sets, so block b+1's
// product can run while the vector units scale block b's sums.
constexpr int kC = 0, kA = 1, kB = 2;

// LDTILECFG's 64-byte operand, palette 1.
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

TileConfig tile_config() {
  TileConfig c;
  for (int set : {0, 1}) {
    const int base = 3 * set;
    c.rows[base + kC] = kTokens;
    c.bytes_per_row[base + kC] = kInterleavedRows * 4;
    c.rows[base + kA] = kTokens;
    c.bytes_per_row[base + kA] = kQuantBlock;
    c.rows[base + kB] = 8;
    c.bytes_per_row[base + kB] = 4 * kInterleavedRows;
  }
  return c;
}

// Block b's sums into `sums` (16 x 16 int32, row t = token t0 + t), on
// register set 0 or 1. GCC's tile intrinsics paste their tile numbers into
// the assembly, so they must be literals.
[[gnu::always_inline]] TOLLGATE_TARGET_AMX inline void block_sums(const MatmulArgs& a, const InterleavedQ8Block& block,
                                                                  std::int64_t b, std::int64_t t0, int set,
                                                                  std::int32_t* sums) {
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  const std::int8_t* x = a.xtiles[t0 / kTokens * blocks + b].q[0];
  constexpr std::int64_t x_stride = kQuantBlock;
  if (set == 0) {
    _tile_zero(0);
    _tile_loadd(1, x, x_stride);
    _tile_loadd(2, block.q, 4 * kInterleavedRows);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, sums, kInterleavedRows * 4);
  } else {
    _tile_zero(3);
    _tile_loadd(4, x, x_stride);
    _tile_loadd(5, block.q, 4 * kInterleavedRows);
    _tile_dpbsud(3, 4, 5);
    _tile_stored(3, sums, kInterleavedRows * 4);
  }
}

// One block's f32 step for 16 tokens: as avx512_vnni's tile, the sums start at
// -128 * sum(x block) to take the weights' + 128 back out.
[[gnu::always_inline]] TOLLGATE_TARGET_AMX inline void scale_block(const MatmulArgs& a, const InterleavedQ8Block& block,
                                                                   std::int64_t b, std::int64_t t0,
                                                                   const std::int32_t* sums, __m512* acc) {
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  const float* xd = a.xd + t0 * blocks + b;
  const std::int32_t* xo = a.xoffset + t0 * blocks + b;
  // The all-lanes masked forms are the plain instructions; unlike those
  // intrinsics, they trip no GCC 12 maybe-uninitialized warning.
  constexpr __mmask16 kAll = 0xffff;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 dw = _mm512_mask_cvtph_ps(zero, kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.scale)));
#pragma GCC unroll 16
  for (int j = 0; j < kTokens; ++j) {
    const __m512i sum =
        _mm512_add_epi32(_mm512_load_si512(sums + j * kInterleavedRows), _mm512_set1_epi32(xo[j * blocks]));
    acc[j] = _mm512_fmadd_ps(_mm512_mask_cvtepi32_ps(zero, kAll, sum),
                             _mm512_mul_ps(dw, _mm512_set1_ps(xd[j * blocks])), acc[j]);
  }
}

// 16 tokens from t0 against one group.
TOLLGATE_TARGET_AMX void tile(const MatmulArgs& a, const InterleavedQ8Block* group, std::int64_t r0, std::int64_t t0) {
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  // Double-buffered: block b + 1's tile product is issued before block b's
  // sums are scaled, on the other register set. (Starting products further
  // ahead measured slower: a set is then reused right after its last use.)
  constexpr int kDepth = 2;
  alignas(64) std::int32_t sums[kDepth][kTokens * kInterleavedRows];
  __m512 acc[kTokens];
#pragma GCC unroll 16
  for (int j = 0; j < kTokens; ++j) acc[j] = _mm512_setzero_ps();
  for (std::int64_t b = 0; b < std::min<std::int64_t>(kDepth - 1, blocks); ++b) {
    block_sums(a, group[b], b, t0, static_cast<int>(b % 2), sums[b % kDepth]);
  }
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t next = b + kDepth - 1;
    // As in avx512_vnni's tile: fetch ahead along the thread's groups.
    const char* ahead = reinterpret_cast<const char*>(&group[b]) + kPrefetchBytes;
#pragma GCC unroll 9
    for (int line = 0; line < 9; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    if (next < blocks) block_sums(a, group[next], next, t0, static_cast<int>(next % 2), sums[next % kDepth]);
    scale_block(a, group[b], b, t0, sums[b % kDepth], acc);
  }
  const std::int64_t count = a.w->rows - r0;
  const auto mask = static_cast<__mmask16>(count >= kInterleavedRows ? 0xffff : (1u << count) - 1);
#pragma GCC unroll 16
  for (int j = 0; j < kTokens; ++j) _mm512_mask_storeu_ps(a.y + (t0 + j) * a.w->rows + r0, mask, acc[j]);
}

}  // namespace

TOLLGATE_TARGET_AMX void matmul_rows_q8_0(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  if (a.xtiles == nullptr) return avx512_vnni::matmul_rows_q8_0(a, row_begin, row_end);
  // The tile configuration is per thread; loading it is cheap next to a call.
  static const TileConfig config = tile_config();
  _tile_loadconfig(&config);
  for (std::int64_t r = row_begin; r < row_end; r += kInterleavedRows) {
    const InterleavedQ8Block* group = avx512_vnni::group_at(*a.w, r);
    std::int64_t t = 0;
    for (; t + kTokens <= a.n; t += kTokens) tile(a, group, r, t);
    if (t < a.n) avx512_vnni::group_tokens(a, group, r, t);
  }
  _tile_release();
}

}  // namespace tollgate::local_engine::cpu::kernels::amx
