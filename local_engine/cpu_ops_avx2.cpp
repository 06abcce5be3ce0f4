// AVX2 + FMA + F16C kernels (and AVX-VNNI variants of the quantised ones),
// compiled per function with target attributes so the rest of the binary still
// runs on CPUs without them; cpu_ops.cpp calls in only after checking the CPU.
// Every dot product of a row with a token is one 8-lane accumulator updated in
// column order and reduced the same way, whatever tile it falls in, so
// batching never changes a result.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "local_engine/cpu_kernels.hpp"

namespace tollgate::local_engine::cpu::kernels::avx2 {

namespace {

constexpr int kLanes = 8;

[[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Loaders turn 8 weights of a row starting at column k into f32.
struct F32Load {
  static constexpr int kBytes = 4;
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static __m256 load(const std::byte* row,
                                                                                     std::int64_t k) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
};

struct F16Load {
  static constexpr int kBytes = 2;
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static __m256 load(const std::byte* row,
                                                                                     std::int64_t k) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k * 2)));
  }
};

struct BF16Load {
  static constexpr int kBytes = 2;
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static __m256 load(const std::byte* row,
                                                                                     std::int64_t k) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k * 2)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
};

// R rows x T tokens of a float-weight matmul; each row's 8 weights are
// converted once per step and used for all T tokens.
template <typename Load>
struct FloatTile {
  template <int R, int T>
  __attribute__((target("avx2,fma,f16c"))) static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
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
struct Q8Load {
  static constexpr int kBlockBytes = sizeof(BlockQ8_0);
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static __m256i values(const std::byte* row,
                                                                                        std::int64_t b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const BlockQ8_0*>(row)[b].q));
  }
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static float scale(const std::byte* row,
                                                                                     std::int64_t b) {
    return _cvtsh_ss(reinterpret_cast<const BlockQ8_0*>(row)[b].scale);
  }
};

struct Q4Load {
  static constexpr int kBlockBytes = sizeof(BlockQ4_0);
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static __m256i values(const std::byte* row,
                                                                                        std::int64_t b) {
    // Low nibbles are values 0..15, high nibbles 16..31, each stored + 8.
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const BlockQ4_0*>(row)[b].q));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    __m128i low = _mm_and_si128(packed, nibble);
    __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    return _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8));
  }
  [[gnu::always_inline]] __attribute__((target("avx2,fma,f16c"))) static float scale(const std::byte* row,
                                                                                     std::int64_t b) {
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
  __attribute__((target("avx2,fma,f16c"))) static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
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
  __attribute__((target("avx2,fma,f16c,avxvnni"))) static void run(const MatmulArgs& a, std::int64_t r0,
                                                                   std::int64_t t0) {
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

// Applies row tiles to all tokens in T-token tiles, one L2-sized block of
// tokens at a time. A single token uses taller tiles (R1 rows) so enough
// independent accumulators are in flight to keep up with memory.
template <typename Tile, int R1, int R, int T>
__attribute__((target("avx2,fma,f16c"))) void sweep(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
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

}  // namespace

__attribute__((target("avx2,fma,f16c"))) void matmul_rows(const MatmulArgs& a, std::int64_t row_begin,
                                                          std::int64_t row_end) {
  switch (a.w->type) {
    case DType::f32:
      return sweep<FloatTile<F32Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::f16:
      return sweep<FloatTile<F16Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::bf16:
      return sweep<FloatTile<BF16Load>, 4, 4, 3>(a, row_begin, row_end);
    case DType::q8_0:
      return sweep<QuantTile<Q8Load>, 4, 2, 4>(a, row_begin, row_end);
    case DType::q4_0:
      return sweep<QuantTile<Q4Load>, 4, 2, 4>(a, row_begin, row_end);
  }
}

__attribute__((target("avx2,fma,f16c"))) float dot(const float* a, const float* b, std::int64_t n) {
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

__attribute__((target("avx2,fma,f16c"))) void axpy(float a, const float* x, float* y, std::int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
  }
  for (; k < n; ++k) y[k] = std::fma(a, x[k], y[k]);
}

}  // namespace tollgate::local_engine::cpu::kernels::avx2

namespace tollgate::local_engine::cpu::kernels::avx2_vnni {

void matmul_rows(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  switch (a.w->type) {
    case DType::q8_0:
      return avx2::sweep<avx2::VnniQuantTile<avx2::Q8Load>, 4, 2, 4>(a, row_begin, row_end);
    case DType::q4_0:
      return avx2::sweep<avx2::VnniQuantTile<avx2::Q4Load>, 4, 2, 4>(a, row_begin, row_end);
    case DType::f32:
    case DType::f16:
    case DType::bf16:
      return avx2::matmul_rows(a, row_begin, row_end);
  }
}

}  // namespace tollgate::local_engine::cpu::kernels::avx2_vnni
