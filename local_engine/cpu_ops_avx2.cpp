// AVX2 + FMA + F16C kernels (and AVX-VNNI variants of the quantised ones),
// compiled per function with target attributes so the rest of the binary still
// runs on CPUs without them; cpu_ops.cpp calls in only after checking the CPU.
// Every dot product of a row with a token is one 8-lane accumulator updated in
// column order and reduced the same way, whatever tile it falls in (Q8_0: one
// f32 lane per row, updated per block, see q8_sweep), so batching never
// changes a result.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "local_engine/cpu_kernels.hpp"
#include "local_engine/cpu_targets.hpp"

namespace tollgate::local_engine::cpu::kernels::avx2 {

namespace {

constexpr int kLanes = 8;

[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Loaders turn 8 weights of a row starting at column k into f32.
struct F32Load {
  static constexpr int kBytes = 4;
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static __m256 load(const std::byte* row, std::int64_t k) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
};

struct F16Load {
  static constexpr int kBytes = 2;
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static __m256 load(const std::byte* row, std::int64_t k) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k * 2)));
  }
};

struct BF16Load {
  static constexpr int kBytes = 2;
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static __m256 load(const std::byte* row, std::int64_t k) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k * 2)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
};

// R rows x T tokens of a float-weight matmul; each row's 8 weights are
// converted once per step and used for all T tokens.
template <typename Load>
struct FloatTile {
  template <int R, int T>
  TOLLGATE_TARGET_AVX2 static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
    const Tensor& w = *a.w;
    const std::int64_t cols = w.cols;
    const std::byte* rows[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) rows[i] = w.row(r0 + i);
    const float* xs[T];
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) xs[j] = a.x + (t0 + j) * cols;
    __m256 acc[R][T];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
    std::int64_t k = 0;
    for (; k + kLanes <= cols; k += kLanes) {
      __m256 wv[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) wv[i] = Load::load(rows[i], k);
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        __m256 xv = _mm256_loadu_ps(xs[j] + k);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
      }
    }
    if (k < cols) {
      // The tail is one more step over zero-padded lanes.
      const auto count = static_cast<std::size_t>(cols - k);
      __m256 wv[R];
      for (int i = 0; i < R; ++i) {
        alignas(32) std::byte padded[kLanes * 4] = {};
        std::memcpy(padded, rows[i] + k * Load::kBytes, count * Load::kBytes);
        wv[i] = Load::load(padded, 0);
      }
      for (int j = 0; j < T; ++j) {
        alignas(32) float padded[kLanes] = {};
        std::memcpy(padded, xs[j] + k, count * 4);
        __m256 xv = _mm256_load_ps(padded);
        for (int i = 0; i < R; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) a.y[(t0 + j) * w.rows + r0 + i] = hsum(acc[i][j]);
  }
};

// Loaders for quantised rows: block b as 32 signed bytes and its scale.
struct Q4Load {
  static constexpr int kBlockBytes = sizeof(BlockQ4_0);
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static __m256i values(const std::byte* row, std::int64_t b) {
    // Low nibbles are values 0..15, high nibbles 16..31, each stored + 8.
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const BlockQ4_0*>(row)[b].q));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    __m128i low = _mm_and_si128(packed, nibble);
    __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    return _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8));
  }
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static float scale(const std::byte* row, std::int64_t b) {
    return _cvtsh_ss(reinterpret_cast<const BlockQ4_0*>(row)[b].scale);
  }
};

// R rows x T tokens of a quantised matmul against Q8_0 activations. Per block
// and pair: maddubs needs an unsigned operand, so it multiplies |w| by x with
// w's sign moved onto it (ggml's trick; |w|, |x| <= 127 cannot saturate the
// 16-bit pair sums), then madd widens to 8 exact int32 lane sums that are
// scaled by d_w * d_x into the f32 accumulator.
template <typename Load>
struct QuantTile {
  template <int R, int T>
  TOLLGATE_TARGET_AVX2 static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
    const Tensor& w = *a.w;
    const std::int64_t blocks = w.cols / kQuantBlock;
    const auto stride = static_cast<std::int64_t>(row_bytes(w.type, w.cols));
    const std::byte* rows[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) rows[i] = w.row(r0 + i);
    const BlockQ8_0* xq = a.xq + t0 * blocks;
    const float* xd = a.xd + t0 * blocks;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R][T];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < blocks; ++b) {
      __m256i wq[R];
      __m256i wabs[R];
      float wd[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        // Rows are short (a 768-column Q8_0 row is 816 bytes), too short for
        // the hardware prefetcher to ramp up on: fetch the next tile's rows.
        _mm_prefetch(reinterpret_cast<const char*>(rows[i] + R * stride) + b * Load::kBlockBytes, _MM_HINT_T0);
        wq[i] = Load::values(rows[i], b);
        wabs[i] = _mm256_sign_epi8(wq[i], wq[i]);
        wd[i] = Load::scale(rows[i], b);
      }
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[j * blocks + b].q));
        float d = xd[j * blocks + b];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          __m256i pairs = _mm256_maddubs_epi16(wabs[i], _mm256_sign_epi8(xv, wq[i]));
          __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc[i][j] = _mm256_fmadd_ps(sums, _mm256_set1_ps(wd[i] * d), acc[i][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) a.y[(t0 + j) * w.rows + r0 + i] = hsum(acc[i][j]);
  }
};

// QuantTile with each block's integer dot as one AVX-VNNI vpdpbusd per pair
// instead of sign + maddubs + madd. vpdpbusd multiplies unsigned by signed
// bytes, so x is offset to x + 128 (flipping its sign bit) and the sum starts
// from -128 * sum(w) per lane, computed once per row and block: the int32 lane
// sums (bytes 4l..4l+3) are exactly those of the maddubs path, and the f32
// steps after them are the same, so results are bit-identical to QuantTile.
template <typename Load>
struct VnniQuantTile {
  template <int R, int T>
  TOLLGATE_TARGET_AVX2_VNNI static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
    const Tensor& w = *a.w;
    const std::int64_t blocks = w.cols / kQuantBlock;
    const auto stride = static_cast<std::int64_t>(row_bytes(w.type, w.cols));
    const std::byte* rows[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) rows[i] = w.row(r0 + i);
    const BlockQ8_0* xq = a.xq + t0 * blocks;
    const float* xd = a.xd + t0 * blocks;
    const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[R][T];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[i][j] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < blocks; ++b) {
      __m256i wq[R];
      __m256i start[R];
      float wd[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[i] + R * stride) + b * Load::kBlockBytes, _MM_HINT_T0);
        wq[i] = Load::values(rows[i], b);
        start[i] = _mm256_sub_epi32(zero, _mm256_dpbusd_avx_epi32(zero, offset, wq[i]));
        wd[i] = Load::scale(rows[i], b);
      }
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        __m256i xv =
            _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[j * blocks + b].q)), offset);
        float d = xd[j * blocks + b];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          __m256 sums = _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(start[i], xv, wq[i]));
          acc[i][j] = _mm256_fmadd_ps(sums, _mm256_set1_ps(wd[i] * d), acc[i][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) a.y[(t0 + j) * w.rows + r0 + i] = hsum(acc[i][j]);
  }
};

// Q8_0 weights against Q8_0 activations, one f32 lane per row. Per row r and
// block b the 32-value integer dot isum is exact, and the row's accumulator is
// updated once per block, in block order:
//   acc_r = fma(float(isum), d_w * d_x, acc_r)
// whichever kernel computes it (8 rows per vector here, 16 in the AVX-512
// one), so every n and instruction set gives the same bits.
constexpr int kHalfRows = kInterleavedRows / 2;
// Without an interleaved copy of the weights, fewer tokens than this use the
// rows in place; more amortise interleaving them on the call.
constexpr std::int64_t kInterleaveMinTokens = 2;

// Rows past the matrix repeat its last row; their lanes are never stored.
[[gnu::always_inline]] inline void group_rows(const Tensor& w, std::int64_t r0, const BlockQ8_0* rows[kHalfRows]) {
  for (int i = 0; i < kHalfRows; ++i) {
    rows[i] = reinterpret_cast<const BlockQ8_0*>(w.row(std::min(r0 + i, w.rows - 1)));
  }
}

// Block b's 8 row scales as f32.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256 group_scales(const BlockQ8_0* const rows[kHalfRows],
                                                                       std::int64_t b) {
  return _mm256_cvtph_ps(_mm_setr_epi16(static_cast<short>(rows[0][b].scale), static_cast<short>(rows[1][b].scale),
                                        static_cast<short>(rows[2][b].scale), static_cast<short>(rows[3][b].scale),
                                        static_cast<short>(rows[4][b].scale), static_cast<short>(rows[5][b].scale),
                                        static_cast<short>(rows[6][b].scale), static_cast<short>(rows[7][b].scale)));
}

// Rows 0-7 (half 0) or 8-15 (half 1) of an interleaved block's scales as f32.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256 half_scales(const InterleavedQ8Block& block, int half) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block.scale + kHalfRows * half)));
}

// Chunk k of an interleaved block for rows 0-7 or 8-15 (as stored, + 128).
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256i half_chunk(const InterleavedQ8Block& block, int k,
                                                                      int half) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.q[k] + 4 * kHalfRows * half));
}

// Token t's bytes 4k..4k+3 of block b, in every int32 lane.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256i token_chunk(const BlockQ8_0& x, int k) {
  std::int32_t chunk;
  std::memcpy(&chunk, x.q + 4 * k, 4);
  return _mm256_set1_epi32(chunk);
}

// The 8 rows' lanes from r0 for token t into y, dropping rows past the matrix.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline void store_group(const MatmulArgs& a, std::int64_t r0,
                                                                    std::int64_t t, __m256 acc) {
  float* out = a.y + t * a.w->rows + r0;
  if (r0 + kHalfRows <= a.w->rows) {
    _mm256_storeu_ps(out, acc);
    return;
  }
  if (r0 >= a.w->rows) return;
  alignas(32) float lanes[kHalfRows];
  _mm256_store_ps(lanes, acc);
  std::memcpy(out, lanes, static_cast<std::size_t>(a.w->rows - r0) * 4);
}

// A thread's groups lie back to back: fetch 4 KiB ahead along them, a line at
// a time (a block spans 8.5 lines), further than the hardware prefetcher
// ramps up to within one call.
[[gnu::always_inline]] inline void prefetch_ahead(const InterleavedQ8Block& block) {
  const char* ahead = reinterpret_cast<const char*>(&block) + 4096;
#pragma GCC unroll 9
  for (int line = 0; line < 9; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
}

// Two ways to form an interleaved block's integer sums. Each tile() runs T
// tokens against one 16-row group: per block the sums of both halves for T
// tokens, then one f32 step per token and half, as in scale_block. tile() is
// repeated in each: a function built for AVX-VNNI cannot be inlined into one
// built without it.
template <int T>
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline void scale_block(const MatmulArgs& a,
                                                                    const InterleavedQ8Block& block, std::int64_t b,
                                                                    std::int64_t t0, const __m256i (*isum)[T],
                                                                    __m256 (*acc)[T]) {
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  const float* xd = a.xd + t0 * blocks + b;
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256 dw = half_scales(block, h);
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) {
      acc[h][j] =
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h][j]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[j * blocks])), acc[h][j]);
    }
  }
}

// This one makes the weights signed again and multiplies with maddubs as in QuantTile.
struct InterleavedDot {
  template <int T>
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2 static void sums(const MatmulArgs& a, const InterleavedQ8Block& block,
                                                               std::int64_t b, std::int64_t t0, __m256i (*isum)[T]) {
    const std::int64_t blocks = a.w->cols / kQuantBlock;
    const BlockQ8_0* xq = a.xq + t0 * blocks + b;
    const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) isum[h][j] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i ws = _mm256_xor_si256(half_chunk(block, k, h), offset);
        const __m256i wabs = _mm256_sign_epi8(ws, ws);
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) {
          __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(token_chunk(xq[j * blocks], k), ws));
          isum[h][j] = _mm256_add_epi32(isum[h][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  }
  template <int T>
  TOLLGATE_TARGET_AVX2 static void tile(const MatmulArgs& a, const InterleavedQ8Block* group, std::int64_t r0,
                                        std::int64_t t0) {
    __m256 acc[2][T];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[h][j] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < a.w->cols / kQuantBlock; ++b) {
      prefetch_ahead(group[b]);
      __m256i isum[2][T];
      sums<T>(a, group[b], b, t0, isum);
      scale_block<T>(a, group[b], b, t0, isum, acc);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) store_group(a, r0 + kHalfRows * h, t0 + j, acc[h][j]);
  }
};

// vpdpbusd on the stored weights + 128, each sum starting at -128 * sum(x
// block) to take the offset back out.
struct VnniInterleavedDot {
  template <int T>
  [[gnu::always_inline]] TOLLGATE_TARGET_AVX2_VNNI static void sums(const MatmulArgs& a,
                                                                    const InterleavedQ8Block& block, std::int64_t b,
                                                                    std::int64_t t0, __m256i (*isum)[T]) {
    const std::int64_t blocks = a.w->cols / kQuantBlock;
    const BlockQ8_0* xq = a.xq + t0 * blocks + b;
    const std::int32_t* xo = a.xoffset + t0 * blocks + b;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) isum[h][j] = _mm256_set1_epi32(xo[j * blocks]);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m256i w0 = half_chunk(block, k, 0);
      const __m256i w1 = half_chunk(block, k, 1);
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) {
        const __m256i x = token_chunk(xq[j * blocks], k);
        isum[0][j] = _mm256_dpbusd_avx_epi32(isum[0][j], w0, x);
        isum[1][j] = _mm256_dpbusd_avx_epi32(isum[1][j], w1, x);
      }
    }
  }
  template <int T>
  TOLLGATE_TARGET_AVX2_VNNI static void tile(const MatmulArgs& a, const InterleavedQ8Block* group, std::int64_t r0,
                                             std::int64_t t0) {
    __m256 acc[2][T];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) acc[h][j] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < a.w->cols / kQuantBlock; ++b) {
      prefetch_ahead(group[b]);
      __m256i isum[2][T];
      sums<T>(a, group[b], b, t0, isum);
      scale_block<T>(a, group[b], b, t0, isum, acc);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) store_group(a, r0 + kHalfRows * h, t0 + j, acc[h][j]);
  }
};

// One token against 8 rows read in place: each row's 8 lane sums (maddubs as
// in QuantTile) are added across lanes in integers, giving the same exact
// isum per row as the interleaved kernels.
TOLLGATE_TARGET_AVX2 void in_place_group(const MatmulArgs& a, std::int64_t r0, std::int64_t t) {
  const std::int64_t blocks = a.w->cols / kQuantBlock;
  const auto stride = static_cast<std::int64_t>(row_bytes(a.w->type, a.w->cols));
  const BlockQ8_0* rows[kHalfRows];
  group_rows(*a.w, r0, rows);
  const BlockQ8_0* xq = a.xq + t * blocks;
  const float* xd = a.xd + t * blocks;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (std::int64_t b = 0; b < blocks; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[b].q));
    __m256i lanes[kHalfRows];
#pragma GCC unroll 8
    for (int i = 0; i < kHalfRows; ++i) {
      // Rows are short, too short for the hardware prefetcher to ramp up on:
      // fetch the next group's rows.
      _mm_prefetch(reinterpret_cast<const char*>(&rows[i][b]) + kHalfRows * stride, _MM_HINT_T0);
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i][b].q));
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xv, wq));
      lanes[i] = _mm256_madd_epi16(pairs, ones);
    }
    const __m256i h0 = _mm256_hadd_epi32(lanes[0], lanes[1]);
    const __m256i h1 = _mm256_hadd_epi32(lanes[2], lanes[3]);
    const __m256i h2 = _mm256_hadd_epi32(lanes[4], lanes[5]);
    const __m256i h3 = _mm256_hadd_epi32(lanes[6], lanes[7]);
    // Rows 0-3 then 4-7, lanes 0-3 of each row in the low half, 4-7 in the high.
    const __m256i g0 = _mm256_hadd_epi32(h0, h1);
    const __m256i g1 = _mm256_hadd_epi32(h2, h3);
    const __m256i isum =
        _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
    const __m256 dw = group_scales(rows, b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(xd[b])), acc);
  }
  store_group(a, r0, t, acc);
}

// The group's blocks: w's interleaved copy when it has one, else interleaved
// now into `scratch` (per thread, and it only grows: no allocation once warm).
TOLLGATE_TARGET_AVX2 const InterleavedQ8Block* group_at(const Tensor& w, std::int64_t r0) {
  const std::int64_t blocks = w.cols / kQuantBlock;
  if (w.interleaved != nullptr) {
    return static_cast<const InterleavedQ8Block*>(w.interleaved) + r0 / kInterleavedRows * blocks;
  }
  thread_local std::vector<InterleavedQ8Block> scratch;
  if (scratch.size() < static_cast<std::size_t>(blocks)) scratch.resize(static_cast<std::size_t>(blocks));
  interleave_q8_group(w, r0, scratch.data());
  return scratch.data();
}

template <typename Dot, int T>
TOLLGATE_TARGET_AVX2 void q8_sweep(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  if (a.w->interleaved == nullptr && a.n < kInterleaveMinTokens) {
    for (std::int64_t r = row_begin; r < row_end; r += kHalfRows) {
      for (std::int64_t t = 0; t < a.n; ++t) in_place_group(a, r, t);
    }
    return;
  }
  for (std::int64_t r = row_begin; r < row_end; r += kInterleavedRows) {
    const InterleavedQ8Block* group = group_at(*a.w, r);
    std::int64_t t = 0;
    for (; t + T <= a.n; t += T) Dot::template tile<T>(a, group, r, t);
    for (; t < a.n; ++t) Dot::template tile<1>(a, group, r, t);
  }
}

// Applies row tiles to all tokens in T-token tiles, one L2-sized block of
// tokens at a time. A single token uses taller tiles (R1 rows) so enough
// independent accumulators are in flight to keep up with memory.
template <typename Tile, int R1, int R, int T>
TOLLGATE_TARGET_AVX2 void sweep(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  if (a.n == 1) {
    std::int64_t r = row_begin;
    for (; r + R1 <= row_end; r += R1) Tile::template run<R1, 1>(a, r, 0);
    for (; r < row_end; ++r) Tile::template run<1, 1>(a, r, 0);
    return;
  }
  const std::int64_t block = token_block(a.w->cols);
  for (std::int64_t t_begin = 0; t_begin < a.n; t_begin += block) {
    const std::int64_t t_end = std::min(a.n, t_begin + block);
    std::int64_t r = row_begin;
    for (; r + R <= row_end; r += R) {
      std::int64_t t = t_begin;
      for (; t + T <= t_end; t += T) Tile::template run<R, T>(a, r, t);
      for (; t < t_end; ++t) Tile::template run<R, 1>(a, r, t);
    }
    for (; r < row_end; ++r) {
      std::int64_t t = t_begin;
      for (; t + T <= t_end; t += T) Tile::template run<1, T>(a, r, t);
      for (; t < t_end; ++t) Tile::template run<1, 1>(a, r, t);
    }
  }
}

// The first `count` (< 8) lanes: maskload through it reads only those (the
// rest are zero) and never touches memory past them.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256i lane_mask(std::int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Cached rows are scattered (each sequence's slots, block by block) and short
// (a head is a few hundred bytes): the hardware prefetcher cannot follow
// them, so attend fetches the rows this many positions ahead.
constexpr std::int64_t kPrefetchPositions = 8;

[[gnu::always_inline]] inline void prefetch_row(const float* row, std::int64_t bytes) {
  for (std::int64_t offset = 0; offset < bytes; offset += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row) + offset, _MM_HINT_T0);
  }
}

// q·k for 8 keys at once, lane j for k[j]: each is one 8-lane accumulator
// updated in column order (the last partial step masked) and reduced by the
// same tree whatever lane it lands in.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256 dot8(const float* q, const float* const* k, std::int64_t n) {
  __m256 acc[kLanes];
#pragma GCC unroll 8
  for (int j = 0; j < kLanes; ++j) acc[j] = _mm256_setzero_ps();
  std::int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + d), acc[j]);
  }
  if (d < n) {
    const __m256i mask = lane_mask(n - d);
    const __m256 qv = _mm256_maskload_ps(q + d, mask);
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[j] + d, mask), acc[j]);
  }
  // hadd pairs lanes within 128-bit halves: abcd = [a0123 b0123 c0123 d0123 | a4567 ... d4567].
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 efgh = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
}

// out[0, 8C) (+ a masked partial vector of `tail` floats) = Σ_p w[p] · v_p,
// each output lane one FMA chain in position order.
template <int C>
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline void weighted_sum(const float* values, std::int64_t stride,
                                                                     const std::int64_t* slots, const float* w,
                                                                     std::int64_t len, std::int64_t tail, float* out) {
  // Fully unrolled (all C + 1), or the accumulators live on the stack.
  __m256 acc[C + 1];
#pragma GCC unroll 9
  for (int i = 0; i <= C; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i mask = lane_mask(tail);
  const std::int64_t bytes = (8 * C + (tail > 0 ? kLanes : 0)) * 4;
  for (std::int64_t p = 0; p < len; ++p) {
    const float* v = values + slots[p] * stride;
    if (p + kPrefetchPositions < len) prefetch_row(values + slots[p + kPrefetchPositions] * stride, bytes);
    const __m256 wv = _mm256_broadcast_ss(w + p);
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i) acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i * kLanes), acc[i]);
    if (tail > 0) acc[C] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(v + C * kLanes, mask), acc[C]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < C; ++i) _mm256_storeu_ps(out + i * kLanes, acc[i]);
  if (tail > 0) _mm256_maskstore_ps(out + C * kLanes, mask, acc[C]);
}

}  // namespace

TOLLGATE_TARGET_AVX2 void interleave_q8_group(const Tensor& w, std::int64_t r0, InterleavedQ8Block* out) {
  const std::int64_t blocks = w.cols / kQuantBlock;
  const auto stride = static_cast<std::int64_t>(row_bytes(w.type, w.cols));
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int half = 0; half < 2; ++half) {
    const BlockQ8_0* rows[kHalfRows];
    group_rows(w, r0 + kHalfRows * half, rows);
    for (std::int64_t b = 0; b < blocks; ++b) {
      __m256i v[kHalfRows];
#pragma GCC unroll 8
      for (int i = 0; i < kHalfRows; ++i) {
        // Rows are short, too short for the hardware prefetcher to ramp up
        // on: fetch the next group's rows.
        _mm_prefetch(reinterpret_cast<const char*>(&rows[i][b]) + kInterleavedRows * stride, _MM_HINT_T0);
        v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i][b].q));
        out[b].scale[kHalfRows * half + i] = rows[i][b].scale;
      }
      // 8x8 transpose of 4-byte chunks.
      __m256i t[kHalfRows];
#pragma GCC unroll 4
      for (int i = 0; i < kHalfRows; i += 2) {
        t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
      }
      __m256i u[kHalfRows];
#pragma GCC unroll 2
      for (int i = 0; i < kHalfRows; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        auto* low = reinterpret_cast<__m256i*>(out[b].q[k] + 4 * kHalfRows * half);
        auto* high = reinterpret_cast<__m256i*>(out[b].q[k + 4] + 4 * kHalfRows * half);
        _mm256_storeu_si256(low, _mm256_xor_si256(_mm256_permute2x128_si256(u[k], u[k + 4], 0x20), offset));
        _mm256_storeu_si256(high, _mm256_xor_si256(_mm256_permute2x128_si256(u[k], u[k + 4], 0x31), offset));
      }
    }
  }
}

TOLLGATE_TARGET_AVX2 void matmul_rows(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  switch (a.w->type) {
    case DType::f32:
      return sweep<FloatTile<F32Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::f16:
      return sweep<FloatTile<F16Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::bf16:
      return sweep<FloatTile<BF16Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::q8_0:
      return q8_sweep<InterleavedDot, 2>(a, row_begin, row_end);
    case DType::q4_0:
      return sweep<QuantTile<Q4Load>, 4, 2, 4>(a, row_begin, row_end);
  }
}

TOLLGATE_TARGET_AVX2 void quantize_row_q8_0(const float* x, BlockQ8_0* out, std::int64_t n) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 minus_half = _mm256_set1_ps(-0.5f);
  // packs interleaves 128-bit halves: this puts the 8 values of each vector back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (std::int64_t b = 0; b < n / kQuantBlock; ++b) {
    __m256 v[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + b * kQuantBlock + i * kLanes);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
                             _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].scale = f32_to_fp16(d);
    const __m256 idv = _mm256_set1_ps(id);
    __m256i q[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 scaled = _mm256_mul_ps(v[i], idv);
      const __m256i whole = _mm256_cvttps_epi32(scaled);
      const __m256 frac = _mm256_sub_ps(scaled, _mm256_cvtepi32_ps(whole));
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(frac, half, _CMP_GE_OQ));
      const __m256i down = _mm256_castps_si256(_mm256_cmp_ps(frac, minus_half, _CMP_LE_OQ));
      q[i] = _mm256_add_epi32(_mm256_sub_epi32(whole, up), down);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), _mm256_permutevar8x32_epi32(bytes, order));
  }
}

namespace {

// e^x, 8 lanes: 2^k * e^r with k = round(x / ln 2) and |r| <= ln 2 / 2, e^r
// from Cephes expf's polynomial (within 2 ulp of std::exp). x is clamped
// to [-87, 88], so 2^k stays a normal float; NaN goes through.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_k));
}

// g / (1 + e^-g) * u, cpu::silu_mul's steps.
[[gnu::always_inline]] TOLLGATE_TARGET_AVX2 inline __m256 silu8(__m256 g, __m256 u) {
  const __m256 e = exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

}  // namespace

TOLLGATE_TARGET_AVX2 void silu_mul(float* gate, const float* up, std::int64_t n) {
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    _mm256_storeu_ps(gate + k, silu8(_mm256_loadu_ps(gate + k), _mm256_loadu_ps(up + k)));
  }
  if (k < n) {
    // The same steps on a masked vector: an element's result never depends
    // on where a call's range starts or ends.
    const __m256i mask = lane_mask(n - k);
    _mm256_maskstore_ps(gate + k, mask, silu8(_mm256_maskload_ps(gate + k, mask), _mm256_maskload_ps(up + k, mask)));
  }
}

TOLLGATE_TARGET_AVX2 float dot(const float* a, const float* b, std::int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  std::int64_t k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + kLanes), _mm256_loadu_ps(b + k + kLanes), acc1);
  }
  if (k + kLanes <= n) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    k += kLanes;
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; k < n; ++k) sum = std::fma(a[k], b[k], sum);
  return sum;
}

TOLLGATE_TARGET_AVX2 void axpy(float a, const float* x, float* y, std::int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
  }
  for (; k < n; ++k) y[k] = std::fma(a, x[k], y[k]);
}

TOLLGATE_TARGET_AVX2 void attend(const float* q, const float* keys, const float* values, std::int64_t stride,
                                 const std::int64_t* slots, std::int64_t len, std::int64_t head_dim, float scale,
                                 float* scores, float* out) {
  if (len <= 0) {
    std::fill(out, out + head_dim, 0.0f);
    return;
  }
  // Scores 8 positions at a time; a last partial group repeats its first key
  // in the spare lanes, so every score comes from the same instructions.
  const __m256 scale_v = _mm256_set1_ps(scale);
  __m256 max_v = _mm256_set1_ps(-INFINITY);
  for (std::int64_t p = 0; p < len; p += kLanes) {
    const std::int64_t count = std::min<std::int64_t>(kLanes, len - p);
    const float* k[kLanes];
    for (int j = 0; j < kLanes; ++j) k[j] = keys + slots[p + (j < count ? j : 0)] * stride;
    for (std::int64_t j = p + kPrefetchPositions; j < std::min(len, p + 2 * kPrefetchPositions); ++j) {
      prefetch_row(keys + slots[j] * stride, head_dim * 4);
    }
    const __m256 s = _mm256_mul_ps(dot8(q, k, head_dim), scale_v);
    max_v = _mm256_max_ps(max_v, s);
    if (count == kLanes) {
      _mm256_storeu_ps(scores + p, s);
    } else {
      _mm256_maskstore_ps(scores + p, lane_mask(count), s);
    }
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(max_v), _mm256_extractf128_ps(max_v, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float max = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
  float sum = 0.0f;
  for (std::int64_t p = 0; p < len; ++p) {
    scores[p] = std::exp(scores[p] - max);
    sum += scores[p];
  }
  const float inv = 1.0f / sum;
  for (std::int64_t p = 0; p < len; ++p) scores[p] *= inv;
  // The values in column chunks of at most 8 vectors, one pass over the positions each.
  std::int64_t d = 0;
  for (; d + 8 * kLanes <= head_dim; d += 8 * kLanes)
    weighted_sum<8>(values + d, stride, slots, scores, len, 0, out + d);
  const std::int64_t whole = (head_dim - d) / kLanes;
  const std::int64_t tail = (head_dim - d) % kLanes;
  switch (whole) {
    case 0:
      if (tail > 0) weighted_sum<0>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 1:
      weighted_sum<1>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 2:
      weighted_sum<2>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 3:
      weighted_sum<3>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 4:
      weighted_sum<4>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 5:
      weighted_sum<5>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    case 6:
      weighted_sum<6>(values + d, stride, slots, scores, len, tail, out + d);
      break;
    default:
      weighted_sum<7>(values + d, stride, slots, scores, len, tail, out + d);
      break;
  }
}

}  // namespace tollgate::local_engine::cpu::kernels::avx2

namespace tollgate::local_engine::cpu::kernels::avx2_vnni {

void matmul_rows(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  switch (a.w->type) {
    case DType::q8_0:
      return avx2::q8_sweep<avx2::VnniInterleavedDot, 2>(a, row_begin, row_end);
    case DType::q4_0:
      return avx2::sweep<avx2::VnniQuantTile<avx2::Q4Load>, 4, 2, 4>(a, row_begin, row_end);
    case DType::f32:
    case DType::f16:
    case DType::bf16:
      return avx2::matmul_rows(a, row_begin, row_end);
  }
}

}  // namespace tollgate::local_engine::cpu::kernels::avx2_vnni
