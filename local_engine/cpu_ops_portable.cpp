// Portable kernels: plain C++ written in 8-lane steps that the compiler
// vectorises for whatever the baseline target is. Every dot product of a row
// with a token is computed the same way whatever tile it falls in, so batching
// never changes a result.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "local_engine/cpu_kernels.hpp"

namespace tollgate::local_engine::cpu::kernels::portable {

namespace {

constexpr int kLanes = 8;

float hsum(const float* v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// Loaders turn `count` weights of a row starting at column k into f32.
struct F32Load {
  static void load(const std::byte* row, std::int64_t k, int count, float* out) {
    std::memcpy(out, row + k * 4, static_cast<std::size_t>(count) * 4);
  }
};

struct F16Load {
  static void load(const std::byte* row, std::int64_t k, int count, float* out) {
    std::uint16_t h[kLanes];
    std::memcpy(h, row + k * 2, static_cast<std::size_t>(count) * 2);
    for (int l = 0; l < count; ++l) out[l] = half_to_float(h[l]);
  }
};

struct BF16Load {
  static void load(const std::byte* row, std::int64_t k, int count, float* out) {
    std::uint16_t h[kLanes];
    std::memcpy(h, row + k * 2, static_cast<std::size_t>(count) * 2);
    for (int l = 0; l < count; ++l) out[l] = bf16_to_f32(h[l]);
  }
};

// R rows x T tokens of a float-weight matmul, one 8-lane accumulator per pair.
template <typename Load>
struct FloatTile {
  template <int R, int T>
  static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
    const Tensor& w = *a.w;
    const std::int64_t cols = w.cols;
    const std::byte* rows[R];
    for (int i = 0; i < R; ++i) rows[i] = w.row(r0 + i);
    const float* xs[T];
    for (int j = 0; j < T; ++j) xs[j] = a.x + (t0 + j) * cols;
    float acc[R][T][kLanes] = {};
    float wv[R][kLanes];
    std::int64_t k = 0;
    for (; k + kLanes <= cols; k += kLanes) {
      for (int i = 0; i < R; ++i) Load::load(rows[i], k, kLanes, wv[i]);
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j)
          for (int l = 0; l < kLanes; ++l) acc[i][j][l] += wv[i][l] * xs[j][k + l];
    }
    if (k < cols) {
      // The tail is one more step over zero-padded lanes.
      int count = static_cast<int>(cols - k);
      float xv[T][kLanes] = {};
      for (int i = 0; i < R; ++i) {
        std::fill(wv[i], wv[i] + kLanes, 0.0f);
        Load::load(rows[i], k, count, wv[i]);
      }
      for (int j = 0; j < T; ++j) std::copy(xs[j] + k, xs[j] + cols, xv[j]);
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < T; ++j)
          for (int l = 0; l < kLanes; ++l) acc[i][j][l] += wv[i][l] * xv[j][l];
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) a.y[(t0 + j) * w.rows + r0 + i] = hsum(acc[i][j]);
  }
};

// Loaders for quantised rows: block b as 32 signed values and its scale.
struct Q8Load {
  static const std::int8_t* values(const std::byte* row, std::int64_t b, std::int8_t*) {
    return reinterpret_cast<const BlockQ8_0*>(row)[b].q;
  }
  static float scale(const std::byte* row, std::int64_t b) {
    return half_to_float(reinterpret_cast<const BlockQ8_0*>(row)[b].scale);
  }
};

struct Q4Load {
  static const std::int8_t* values(const std::byte* row, std::int64_t b, std::int8_t* buffer) {
    const auto& block = reinterpret_cast<const BlockQ4_0*>(row)[b];
    for (int l = 0; l < kQuantBlock / 2; ++l) {
      buffer[l] = static_cast<std::int8_t>((block.q[l] & 0x0f) - 8);
      buffer[l + kQuantBlock / 2] = static_cast<std::int8_t>((block.q[l] >> 4) - 8);
    }
    return buffer;
  }
  static float scale(const std::byte* row, std::int64_t b) {
    return half_to_float(reinterpret_cast<const BlockQ4_0*>(row)[b].scale);
  }
};

// R rows x T tokens of a quantised matmul: exact integer dot per block, then
// one f32 multiply-add per block and pair.
template <typename Load>
struct QuantTile {
  template <int R, int T>
  static void run(const MatmulArgs& a, std::int64_t r0, std::int64_t t0) {
    const Tensor& w = *a.w;
    const std::int64_t blocks = w.cols / kQuantBlock;
    const std::byte* rows[R];
    for (int i = 0; i < R; ++i) rows[i] = w.row(r0 + i);
    float acc[R][T] = {};
    std::int8_t buffer[R][kQuantBlock];
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int8_t* wq[R];
      float wd[R];
      for (int i = 0; i < R; ++i) {
        wq[i] = Load::values(rows[i], b, buffer[i]);
        wd[i] = Load::scale(rows[i], b);
      }
      for (int j = 0; j < T; ++j) {
        const std::int8_t* xq = a.xq[(t0 + j) * blocks + b].q;
        const float xd = a.xd[(t0 + j) * blocks + b];
        for (int i = 0; i < R; ++i) {
          std::int32_t sum = 0;
          for (int l = 0; l < kQuantBlock; ++l) sum += wq[i][l] * xq[l];
          acc[i][j] += static_cast<float>(sum) * (wd[i] * xd);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) a.y[(t0 + j) * w.rows + r0 + i] = acc[i][j];
  }
};

// Applies R-row tiles to all tokens in T-token tiles, one L2-sized block of
// tokens at a time; leftovers run as 1-row or 1-token tiles.
template <typename Tile, int R, int T>
void sweep(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
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

void matmul_rows(const MatmulArgs& a, std::int64_t row_begin, std::int64_t row_end) {
  switch (a.w->type) {
    case DType::f32:
      return sweep<FloatTile<F32Load>, 2, 2>(a, row_begin, row_end);
    case DType::f16:
      return sweep<FloatTile<F16Load>, 2, 2>(a, row_begin, row_end);
    case DType::bf16:
      return sweep<FloatTile<BF16Load>, 2, 2>(a, row_begin, row_end);
    case DType::q8_0:
      return sweep<QuantTile<Q8Load>, 2, 2>(a, row_begin, row_end);
    case DType::q4_0:
      return sweep<QuantTile<Q4Load>, 2, 2>(a, row_begin, row_end);
  }
}

float dot(const float* a, const float* b, std::int64_t n) {
  float acc[kLanes] = {};
  std::int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  float sum = hsum(acc);
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

void axpy(float a, const float* x, float* y, std::int64_t n) {
  for (std::int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out) {
  std::fill(out, out + head_dim, 0.0f);
  if (len <= 0) return;
  for (std::int64_t p = 0; p < len; ++p) scores[p] = dot(q, keys + slots[p] * stride, head_dim) * scale;
  const float max = *std::max_element(scores, scores + len);
  float sum = 0.0f;
  for (std::int64_t p = 0; p < len; ++p) {
    scores[p] = std::exp(scores[p] - max);
    sum += scores[p];
  }
  const float inv = 1.0f / sum;
  for (std::int64_t p = 0; p < len; ++p) {
    scores[p] *= inv;
    axpy(scores[p], values + slots[p] * stride, out, head_dim);
  }
}

}  // namespace tollgate::local_engine::cpu::kernels::portable
