// The Q8_0 matmul on AVX-512 VNNI: one 512-bit vpdpbusd per chunk of an
// interleaved block adds to all 16 rows of a group at once (twice the rows of
// the AVX-VNNI kernel per instruction). Compiled per function with target
// attributes, like cpu_ops_avx2.cpp, so the binary still runs without AVX-512.
// Each row's accumulator takes the same steps as in the AVX2 kernels (exact
// integer block sums, then fma(float(isum), d_w * d_x, acc) in block order),
// so results are bit-identical to them for every n.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "local_engine/cpu_kernels.hpp"
#include "local_engine/cpu_targets.hpp"

namespace tollgate::local_engine::cpu::kernels::avx512_vnni {

namespace {

// Token t's bytes 4k..4k+3 of its block, in every int32 lane.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX512_VNNI inline __m512i token_chunk(const BlockQ8_0& x, int k) {
  std::int32_t chunk;
  std::memcpy(&chunk, x.q + 4 * k, 4);
  return _mm512_set1_epi32(chunk);
}

// The 16 rows' lanes from r0 for token t into y, dropping rows past the matrix.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX512_VNNI inline void store_group(const MatmulArgs& a, std::int64_t r0,
                                                                           std::int64_t t, __m512 acc) {
  float* out = a.y + t * a.w->rows + r0;
  const std::int64_t count = a.w->rows - r0;
  if (count >= kInterleavedRows) {
    _mm512_storeu_ps(out, acc);
  } else {
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << count) - 1), acc);
  }
}

constexpr std::int64_t kPrefetchBytes = 4096;

// T tokens against one group. Per block, each token's 16 integer sums start
// at -128 * sum(x block) (taking the + 128 of the stored weights back out) and
// take one vpdpbusd per chunk; with few tokens the chunks alternate between
// two partial sums (exact integers, so the split changes nothing) to halve
// the dependency chain.
template <int T>
TOLLGATE_TARGET_AVX512_VNNI void tile(const MatmulArgs& a, const InterleavedQ8Block* group, std::int64_t r0,
                                      std::int64_t t0) {
  constexpr int kChains = T < 4 ? 2 : 1;
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  const BlockQ8_0* xq = a.xq + t0 * blocks;
  const float* xd = a.xd + t0 * blocks;
  const std::int32_t* xo = a.xoffset + t0 * blocks;
  constexpr __mmask16 kAll = 0xffff;
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc[T];
#pragma GCC unroll 8
  for (int j = 0; j < T; ++j) acc[j] = zero;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const InterleavedQ8Block& block = group[b];
    // A thread's groups lie back to back: fetch ahead along them, a line at a
    // time (a block spans 8.5 lines), further than the hardware prefetcher
    // ramps up to within one call.
    const char* ahead = reinterpret_cast<const char*>(&block) + kPrefetchBytes;
#pragma GCC unroll 9
    for (int line = 0; line < 9; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    __m512i isum[kChains][T];
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      isum[0][j] = _mm512_set1_epi32(xo[j * blocks + b]);
      if constexpr (kChains == 2) isum[1][j] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m512i wu = _mm512_loadu_si512(block.q[k]);
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        isum[k % kChains][j] = _mm512_dpbusd_epi32(isum[k % kChains][j], wu, token_chunk(xq[j * blocks + b], k));
      }
    }
    // The all-lanes masked forms are the plain instructions; unlike those
    // intrinsics, they trip no GCC 12 maybe-uninitialized warning.
    const __m512 dw =
        _mm512_mask_cvtph_ps(zero, kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.scale)));
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      __m512i sum = isum[0][j];
      if constexpr (kChains == 2) sum = _mm512_add_epi32(sum, isum[1][j]);
      acc[j] = _mm512_fmadd_ps(_mm512_mask_cvtepi32_ps(zero, kAll, sum),
                               _mm512_mul_ps(dw, _mm512_set1_ps(xd[j * blocks + b])), acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < T; ++j) store_group(a, r0, t0 + j, acc[j]);
}

}  // namespace

const InterleavedQ8Block* group_at(const Tensor& w, std::int64_t r0) {
  const std::int64_t blocks = w.cols / kQuantBlock;
  if (w.interleaved != nullptr) {
    return static_cast<const InterleavedQ8Block*>(w.interleaved) + r0 / kInterleavedRows * blocks;
  }
  thread_local std::vector<InterleavedQ8Block> scratch;
  if (scratch.size() < static_cast<std::size_t>(blocks)) scratch.resize(static_cast<std::size_t>(blocks));
  avx2::interleave_q8_group(w, r0, scratch.data());
  return scratch.data();
}

TOLLGATE_TARGET_AVX512_VNNI void group_tokens(const MatmulArgs& a, const InterleavedQ8Block* group, std::int64_t r0,
                                              std::int64_t t_begin) {
  constexpr int kTokens = 8;
  std::int64_t t = t_begin;
  for (; t + kTokens <= a.n; t += kTokens) tile<kTokens>(a, group, r0, t);
  if (t + 4 <= a.n) {
    tile<4>(a, group, r0, t);
    t += 4;
  }
  if (t + 2 <= a.n) {
    tile<2>(a, group, r0, t);
    t += 2;
  }
  if (t < a.n) tile<1>(a, group, r0, t);
}

TOLLGATE_TARGET_AVX512_VNNI void matmul_rows_q8_0(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  // A single token against rows read in place (no interleaved copy) is the
  // AVX2 kernel's: interleaving on the call would cost more than it saves.
  if (a.w->interleaved == nullptr && a.n == 1) return avx2::matmul_rows(a, row_begin, row_end);
  for (std::int64_t r = row_begin; r < row_end; r += kInterleavedRows) group_tokens(a, group_at(*a.w, r), r, 0);
}

}  // namespace tollgate::local_engine::cpu::kernels::avx512_vnni
