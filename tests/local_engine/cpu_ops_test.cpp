#include "local_engine/cpu_ops.hpp"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "local_engine/cpu_kernels.hpp"

using namespace tollgate::local_engine;
using cpu::Isa;

namespace {

std::vector<float> random_vector(std::size_t n, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<Isa> testable_isas() {
  std::vector<Isa> isas{Isa::portable};
  if (cpu::isa_supported(Isa::avx2_fma)) {
    isas.push_back(Isa::avx2_fma);
  } else {
    WARN("this CPU has no AVX2/FMA/F16C: only the portable kernels are tested");
  }
  if (cpu::isa_supported(Isa::avx2_vnni)) isas.push_back(Isa::avx2_vnni);
  if (cpu::isa_supported(Isa::avx512_vnni)) isas.push_back(Isa::avx512_vnni);
  if (cpu::isa_supported(Isa::amx)) isas.push_back(Isa::amx);
  return isas;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return "portable";
    case Isa::avx2_fma:
      return "avx2";
    case Isa::avx2_vnni:
      return "avx2+vnni";
    case Isa::avx512_vnni:
      return "avx512+vnni";
    case Isa::amx:
      return "amx";
  }
  return "?";
}

// A weight matrix in one storage type, built from f32 values.
struct Weights {
  std::vector<std::byte> storage;
  std::vector<std::byte> interleaved;
  Tensor tensor;
};

// Q8_0 weights with the interleaved copy a loaded model gives them.
void interleave(Weights& w) {
  w.interleaved.resize(cpu::interleaved_bytes(w.tensor));
  cpu::interleave_q8_0(w.tensor, w.interleaved.data());
  w.tensor.interleaved = w.interleaved.data();
}

// The layouts a weight type reaches the kernels in: Q8_0 with and without its
// interleaved copy.
std::vector<bool> layouts(DType type) { return type == DType::q8_0 ? std::vector{false, true} : std::vector{false}; }

Weights make_weights(DType type, const std::vector<float>& values, std::int64_t rows, std::int64_t cols) {
  Weights w;
  w.storage.resize(static_cast<std::size_t>(rows) * row_bytes(type, cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* src = values.data() + r * cols;
    std::byte* dst = w.storage.data() + static_cast<std::size_t>(r) * row_bytes(type, cols);
    switch (type) {
      case DType::f32:
        std::memcpy(dst, src, static_cast<std::size_t>(cols) * 4);
        break;
      case DType::f16:
      case DType::bf16:
        for (std::int64_t k = 0; k < cols; ++k) {
          std::uint16_t h = type == DType::f16 ? f32_to_fp16(src[k]) : f32_to_bf16(src[k]);
          std::memcpy(dst + k * 2, &h, 2);
        }
        break;
      case DType::q8_0:
        cpu::quantize_row_q8_0(src, reinterpret_cast<BlockQ8_0*>(dst), cols);
        break;
      case DType::q4_0:
        cpu::quantize_row_q4_0(src, reinterpret_cast<BlockQ4_0*>(dst), cols);
        break;
    }
  }
  w.tensor = Tensor{type, w.storage.data(), rows, cols};
  return w;
}

std::vector<float> dequantized(const Tensor& t) {
  std::vector<float> out(static_cast<std::size_t>(t.rows * t.cols));
  for (std::int64_t r = 0; r < t.rows; ++r) cpu::dequantize_row(t, r, out.data() + r * t.cols);
  return out;
}

// x rows as the quantised kernels see them: through Q8_0 and back.
std::vector<float> through_q8_0(const std::vector<float>& x, std::int64_t n, std::int64_t cols) {
  std::vector<BlockQ8_0> blocks(static_cast<std::size_t>(n * cols / kQuantBlock));
  for (std::int64_t t = 0; t < n; ++t) {
    cpu::quantize_row_q8_0(x.data() + t * cols, blocks.data() + t * cols / kQuantBlock, cols);
  }
  return dequantized(Tensor{DType::q8_0, blocks.data(), n, cols});
}

// y[t][r] = sum_k w[r][k] x[t][k] in double, and sum_k |w x| for error bounds.
struct Reference {
  std::vector<double> y;
  std::vector<double> magnitude;
};

Reference reference_matmul(const std::vector<float>& w, const std::vector<float>& x, std::int64_t rows,
                           std::int64_t cols, std::int64_t n) {
  Reference ref{std::vector<double>(static_cast<std::size_t>(n * rows)),
                std::vector<double>(static_cast<std::size_t>(n * rows))};
  for (std::int64_t t = 0; t < n; ++t) {
    for (std::int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      double mag = 0;
      for (std::int64_t k = 0; k < cols; ++k) {
        double p = static_cast<double>(w[r * cols + k]) * x[t * cols + k];
        sum += p;
        mag += std::fabs(p);
      }
      ref.y[t * rows + r] = sum;
      ref.magnitude[t * rows + r] = mag;
    }
  }
  return ref;
}

double nmse(const std::vector<float>& y, const std::vector<double>& ref) {
  double err = 0;
  double norm = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    err += (y[i] - ref[i]) * (y[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return err / norm;
}

// Worst |y - ref| / sum|w x| over all outputs: the dot product's error
// relative to its condition, so near-zero outputs are judged fairly.
double worst_relative_error(const std::vector<float>& y, const Reference& ref, double absolute_slack = 0) {
  double worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    worst = std::max(worst, std::max(0.0, std::fabs(y[i] - ref.y[i]) - absolute_slack) / ref.magnitude[i]);
  }
  return worst;
}

std::vector<float> run_matmul(ThreadPool& pool, const Tensor& w, const std::vector<float>& x, std::int64_t n, Isa isa) {
  std::vector<float> y(static_cast<std::size_t>(n * w.rows), std::nanf(""));
  cpu::matmul(pool, w, x.data(), n, y.data(), isa);
  return y;
}

struct Shape {
  std::int64_t rows;
  std::int64_t cols;
};

}  // namespace

TEST_CASE("features names the active instruction set", "[cpu_ops]") {
  auto f = cpu::features();
  CHECK((f == "avx2+fma+avx512vnni+amx" || f == "avx2+fma+avx512vnni" || f == "avx2+fma+avxvnni" || f == "avx2+fma" ||
         f == "portable"));
  CHECK((f == "avx2+fma+avx512vnni+amx") == (cpu::active_isa() == Isa::amx));
  CHECK((f == "avx2+fma+avx512vnni") == (cpu::active_isa() == Isa::avx512_vnni));
  CHECK((f == "avx2+fma+avxvnni") == (cpu::active_isa() == Isa::avx2_vnni));
  CHECK((f == "avx2+fma") == (cpu::active_isa() == Isa::avx2_fma));
  CHECK(cpu::isa_supported(Isa::portable));
  // VNNI kernels are AVX2 kernels with one more extension.
  if (cpu::isa_supported(Isa::avx2_vnni)) CHECK(cpu::isa_supported(Isa::avx2_fma));
  if (cpu::isa_supported(Isa::avx512_vnni)) CHECK(cpu::isa_supported(Isa::avx2_fma));
  if (cpu::isa_supported(Isa::amx)) CHECK(cpu::isa_supported(Isa::avx512_vnni));
}

TEST_CASE("float-weight matmul matches a double-precision reference", "[cpu_ops][matmul]") {
  ThreadPool pool(3);
  // Odd column counts exercise the zero-padded tail step.
  for (Shape shape : {Shape{67, 96}, Shape{1000, 256}, Shape{13, 37}, Shape{5, 3}}) {
    auto w32 = random_vector(static_cast<std::size_t>(shape.rows * shape.cols), 1);
    for (DType type : {DType::f32, DType::f16, DType::bf16}) {
      auto w = make_weights(type, w32, shape.rows, shape.cols);
      auto converted = dequantized(w.tensor);
      for (std::int64_t n : {1, 3, 16, 33}) {
        auto x = random_vector(static_cast<std::size_t>(n * shape.cols), 2);
        auto exact = reference_matmul(converted, x, shape.rows, shape.cols, n);
        auto original = reference_matmul(w32, x, shape.rows, shape.cols, n);
        for (Isa isa : testable_isas()) {
          INFO(dtype_name(type) << " " << shape.rows << "x" << shape.cols << " n=" << n << " " << isa_name(isa));
          auto y = run_matmul(pool, w.tensor, x, n, isa);
          // Against the weights as stored: only f32 accumulation error.
          CHECK(worst_relative_error(y, exact) < 1e-5);
          // Against the f32 originals: the storage type's unit roundoff (2^-11
          // half, 2^-8 bfloat) bounds it; halves below 2^-14 lose absolute 2^-25.
          double roundoff = type == DType::f32 ? 1e-5 : type == DType::f16 ? 0x1p-11 + 1e-5 : 0x1p-8 + 1e-5;
          double slack = type == DType::f16 ? 0x1p-25 * static_cast<double>(shape.cols) : 0.0;
          CHECK(worst_relative_error(y, original, slack) < roundoff);
        }
      }
    }
  }
}

TEST_CASE("quantised matmul matches references", "[cpu_ops][matmul]") {
  ThreadPool pool(3);
  for (Shape shape : {Shape{67, 96}, Shape{1000, 256}}) {
    auto w32 = random_vector(static_cast<std::size_t>(shape.rows * shape.cols), 3);
    for (DType type : {DType::q8_0, DType::q4_0}) {
      auto w = make_weights(type, w32, shape.rows, shape.cols);
      auto converted = dequantized(w.tensor);
      for (bool interleaved : layouts(type)) {
        if (interleaved) interleave(w);
        for (std::int64_t n : {1, 3, 16, 33}) {
          auto x = random_vector(static_cast<std::size_t>(n * shape.cols), 4);
          // The kernels quantise x to Q8_0 and multiply exactly per block, so
          // against the dequantised operands only f32 accumulation error remains.
          auto exact = reference_matmul(converted, through_q8_0(x, n, shape.cols), shape.rows, shape.cols, n);
          auto original = reference_matmul(w32, x, shape.rows, shape.cols, n);
          for (Isa isa : testable_isas()) {
            INFO(dtype_name(type) << " " << shape.rows << "x" << shape.cols << " n=" << n << " " << isa_name(isa)
                                  << (w.tensor.interleaved != nullptr ? " interleaved" : ""));
            auto y = run_matmul(pool, w.tensor, x, n, isa);
            CHECK(worst_relative_error(y, exact) < 1e-5);
            // Quantisation error against f32 weights and activations (ggml's
            // test-backend-ops measure). Measured: Q8_0 2.8e-5, Q4_0 4.0e-3 to 4.3e-3:
            // 4-bit steps of max/8 on uniform data are ~4e-3 on their own.
            double error = nmse(y, original.y);
            CHECK(error < (type == DType::q8_0 ? 1e-4 : 5e-3));
            CHECK(error > 0);
          }
        }
      }
    }
  }
}

TEST_CASE("a batched matmul row is bit-identical to that row alone", "[cpu_ops][matmul]") {
  ThreadPool pool(2);
  // 2048 columns: a 70-token batch is swept in more than one token block.
  for (Shape shape : {Shape{67, 96}, Shape{9, 2048}, Shape{13, 37}}) {
    auto w32 = random_vector(static_cast<std::size_t>(shape.rows * shape.cols), 5);
    for (DType type : {DType::f32, DType::f16, DType::bf16, DType::q8_0, DType::q4_0}) {
      if (shape.cols % kQuantBlock != 0 && (type == DType::q8_0 || type == DType::q4_0)) continue;
      for (bool interleaved : layouts(type)) {
        auto w = make_weights(type, w32, shape.rows, shape.cols);
        if (interleaved) interleave(w);
        // n = 2 is the fewest tokens the Q8_0 kernels interleave rows on the
        // call for; 11 takes every AVX-512 tile width (8, 2, 1).
        for (std::int64_t n : {2, 11, 16, 70}) {
          auto x = random_vector(static_cast<std::size_t>(n * shape.cols), 6);
          for (Isa isa : testable_isas()) {
            INFO(dtype_name(type) << " " << shape.rows << "x" << shape.cols << " n=" << n << " " << isa_name(isa)
                                  << (interleaved ? " interleaved" : ""));
            auto batched = run_matmul(pool, w.tensor, x, n, isa);
            for (std::int64_t t = 0; t < n; ++t) {
              std::vector<float> row(x.begin() + t * shape.cols, x.begin() + (t + 1) * shape.cols);
              auto alone = run_matmul(pool, w.tensor, row, 1, isa);
              REQUIRE(std::memcmp(alone.data(), batched.data() + t * shape.rows, alone.size() * 4) == 0);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("the VNNI quantised matmuls and interleaved weights are bit-identical to the AVX2 matmul",
          "[cpu_ops][matmul]") {
  if (!cpu::isa_supported(Isa::avx2_fma)) {
    WARN("this CPU has no AVX2/FMA/F16C: there is nothing to compare");
    return;
  }
  std::vector<Isa> isas{Isa::avx2_fma};
  for (Isa isa : {Isa::avx2_vnni, Isa::avx512_vnni, Isa::amx}) {
    if (cpu::isa_supported(isa)) {
      isas.push_back(isa);
    } else {
      WARN("this CPU cannot run " << isa_name(isa) << ": its kernels are not tested");
    }
  }
  ThreadPool pool(2);
  // 1000 rows: the last 16-row group has one half past the matrix.
  for (Shape shape : {Shape{67, 96}, Shape{1000, 256}, Shape{9, 2048}, Shape{5, 32}}) {
    // Extreme weights and activations too: w = -128 (possible in a file, not
    // from our quantiser) and +-127 saturate nothing on either path.
    auto w32 = random_vector(static_cast<std::size_t>(shape.rows * shape.cols), 16, -4.0f, 4.0f);
    for (DType type : {DType::q8_0, DType::q4_0}) {
      auto w = make_weights(type, w32, shape.rows, shape.cols);
      if (type == DType::q8_0) {
        auto* blocks = reinterpret_cast<BlockQ8_0*>(w.storage.data());
        blocks[0].q[0] = -128;
        blocks[0].q[1] = 127;
        blocks[0].q[2] = -127;
      }
      Weights interleaved = w;
      if (type == DType::q8_0) interleave(interleaved);
      interleaved.tensor.data = interleaved.storage.data();
      for (std::int64_t n : {1, 3, 16, 33, 70}) {
        auto x = random_vector(static_cast<std::size_t>(n * shape.cols), 17);
        x[0] = 5.0f;  // the largest magnitude of its block: quantised to 127
        x[1] = -5.0f;
        auto avx2 = run_matmul(pool, w.tensor, x, n, Isa::avx2_fma);
        for (Isa isa : isas) {
          for (const Weights* weights : {&w, &interleaved}) {
            INFO(dtype_name(type) << " " << shape.rows << "x" << shape.cols << " n=" << n << " " << isa_name(isa)
                                  << (weights->tensor.interleaved != nullptr ? " interleaved" : ""));
            auto y = run_matmul(pool, weights->tensor, x, n, isa);
            REQUIRE(std::memcmp(avx2.data(), y.data(), avx2.size() * 4) == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("matmul does not depend on the thread count", "[cpu_ops][matmul]") {
  auto w32 = random_vector(67 * 96, 7);
  auto x = random_vector(5 * 96, 8);
  for (DType type : {DType::f32, DType::q8_0}) {
    auto w = make_weights(type, w32, 67, 96);
    for (Isa isa : testable_isas()) {
      ThreadPool one(1);
      ThreadPool three(3);
      auto a = run_matmul(one, w.tensor, x, 5, isa);
      auto b = run_matmul(three, w.tensor, x, 5, isa);
      CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
    }
  }
}

#if defined(TOLLGATE_X86_KERNELS)
TEST_CASE("the AVX2 activation quantiser gives quantize_row_q8_0's bytes", "[cpu_ops][quant]") {
  if (!cpu::isa_supported(Isa::avx2_fma)) {
    WARN("this CPU has no AVX2: the AVX2 quantiser is not tested");
    return;
  }
  const std::int64_t n = 4096;
  auto x = random_vector(static_cast<std::size_t>(n), 21, -3.0f, 3.0f);
  // With 127 the block's largest magnitude its scale is 1, so k + 0.5 are ties.
  for (int l = 0; l < 32; ++l) x[l] = l == 0 ? 127.0f : static_cast<float>(l) - 16.5f;
  std::fill(x.begin() + 32, x.begin() + 64, 0.0f);
  std::vector<BlockQ8_0> scalar(n / kQuantBlock);
  std::vector<BlockQ8_0> avx2(n / kQuantBlock);
  cpu::quantize_row_q8_0(x.data(), scalar.data(), n);
  cpu::kernels::avx2::quantize_row_q8_0(x.data(), avx2.data(), n);
  REQUIRE(std::memcmp(scalar.data(), avx2.data(), scalar.size() * sizeof(BlockQ8_0)) == 0);
}
#endif

TEST_CASE("quantize_row_q8_0 follows ggml's scheme", "[cpu_ops][quant]") {
  std::vector<float> x(32);
  for (int l = 0; l < 32; ++l) x[l] = static_cast<float>(l - 16);  // amax 16
  BlockQ8_0 block;
  cpu::quantize_row_q8_0(x.data(), &block, 32);
  CHECK(block.scale == f32_to_fp16(16.0f / 127.0f));
  CHECK(block.q[0] == -127);
  CHECK(block.q[31] == 119);  // round(15 * 127 / 16 = 119.06)
  CHECK(block.q[16] == 0);
  CHECK(block.q[24] == 64);  // round(8 * 127 / 16 = 63.5) rounds half away from zero
  CHECK(block.q[8] == -64);

  std::vector<float> zeros(32, 0.0f);
  cpu::quantize_row_q8_0(zeros.data(), &block, 32);
  CHECK(block.scale == 0);
  for (auto q : block.q) CHECK(q == 0);
}

TEST_CASE("quantize_row_q4_0 follows ggml's scheme", "[cpu_ops][quant]") {
  std::vector<float> x(32);
  for (int l = 0; l < 32; ++l) x[l] = static_cast<float>(l % 16 - 8);  // largest magnitude -8: d = 1
  BlockQ4_0 block;
  cpu::quantize_row_q4_0(x.data(), &block, 32);
  CHECK(fp16_to_f32(block.scale) == 1.0f);
  for (int l = 0; l < 16; ++l) CHECK(block.q[l] == (l | l << 4));  // low nibble l, high nibble 16 + l

  // A positive extreme maps to level 0 with a negative scale.
  std::vector<float> y(32, 0.0f);
  y[5] = 10.0f;
  y[20] = -5.0f;
  cpu::quantize_row_q4_0(y.data(), &block, 32);
  CHECK(fp16_to_f32(block.scale) == -1.25f);
  CHECK((block.q[5] & 0x0f) == 0);
  CHECK((block.q[4] >> 4) == 12);  // -5 / -1.25 = 4, + 8
  CHECK((block.q[0] & 0x0f) == 8);
  std::vector<float> back(32);
  cpu::dequantize_row(Tensor{DType::q4_0, &block, 1, 32}, 0, back.data());
  CHECK(back[5] == 10.0f);
  CHECK(back[20] == -5.0f);
  CHECK(back[0] == 0.0f);
}

TEST_CASE("quantise/dequantise round trips stay within half a step", "[cpu_ops][quant]") {
  const std::int64_t n = 32 * 64;
  auto x = random_vector(n, 9, -3.0f, 3.0f);
  std::vector<BlockQ8_0> q8(n / 32);
  std::vector<BlockQ4_0> q4(n / 32);
  cpu::quantize_row_q8_0(x.data(), q8.data(), n);
  cpu::quantize_row_q4_0(x.data(), q4.data(), n);
  std::vector<float> back8(n), back4(n);
  cpu::dequantize_row(Tensor{DType::q8_0, q8.data(), 1, n}, 0, back8.data());
  cpu::dequantize_row(Tensor{DType::q4_0, q4.data(), 1, n}, 0, back4.data());
  for (std::int64_t i = 0; i < n; ++i) {
    // Half a step, plus the fp16 rounding of the scale times the largest level.
    float d8 = std::fabs(fp16_to_f32(q8[i / 32].scale));
    float d4 = std::fabs(fp16_to_f32(q4[i / 32].scale));
    REQUIRE(std::fabs(back8[i] - x[i]) <= 0.5f * d8 + 127 * d8 * 0x1p-11f + 1e-6f);
    // Q4_0 maps the extreme to level 0 (-8 d), so the other side tops out at
    // level 15 (+7 d): values beyond 7.5 d there are clamped, up to a whole step off.
    float step = std::fabs(x[i]) > 7.5f * d4 ? 1.0f : 0.5f;
    REQUIRE(std::fabs(back4[i] - x[i]) <= step * d4 + 8 * d4 * 0x1p-11f + 1e-6f);
  }
}

TEST_CASE("dequantize_row decodes every type", "[cpu_ops]") {
  // Every half pattern, against the reference conversion in tensor.cpp.
  std::vector<std::uint16_t> halves(65536);
  for (std::uint32_t h = 0; h < 65536; ++h) halves[h] = static_cast<std::uint16_t>(h);
  std::vector<float> out(65536);
  cpu::dequantize_row(Tensor{DType::f16, halves.data(), 1, 65536}, 0, out.data());
  for (std::uint32_t h = 0; h < 65536; ++h) {
    float expected = fp16_to_f32(halves[h]);
    if (std::isnan(expected)) {
      REQUIRE(std::isnan(out[h]));
    } else {
      REQUIRE(std::memcmp(&out[h], &expected, 4) == 0);
    }
  }
  cpu::dequantize_row(Tensor{DType::bf16, halves.data(), 1, 65536}, 0, out.data());
  for (std::uint32_t h = 0; h < 65536; h += 97) {
    float expected = bf16_to_f32(halves[h]);
    REQUIRE(std::memcmp(&out[h], &expected, 4) == 0);
  }
  std::vector<float> rows = random_vector(3 * 64, 10);
  float row1[64];
  cpu::dequantize_row(Tensor{DType::f32, rows.data(), 3, 64}, 1, row1);
  CHECK(std::memcmp(row1, rows.data() + 64, sizeof row1) == 0);
  BlockQ8_0 block{f32_to_fp16(0.5f), {}};
  block.q[3] = -7;
  block.q[31] = 127;
  float q8[32];
  cpu::dequantize_row(Tensor{DType::q8_0, &block, 1, 32}, 0, q8);
  CHECK(q8[3] == -3.5f);
  CHECK(q8[31] == 63.5f);
  CHECK(q8[0] == 0.0f);
}

TEST_CASE("dot and axpy match references on both code paths", "[cpu_ops]") {
  for (std::int64_t n : {0, 1, 7, 8, 9, 16, 64, 100, 1001}) {
    auto a = random_vector(static_cast<std::size_t>(n), 11);
    auto b = random_vector(static_cast<std::size_t>(n), 12);
    double expected = 0;
    double magnitude = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      expected += static_cast<double>(a[i]) * b[i];
      magnitude += std::fabs(static_cast<double>(a[i]) * b[i]);
    }
    for (Isa isa : testable_isas()) {
      INFO("n=" << n << " " << isa_name(isa));
      CHECK(std::fabs(cpu::dot(a.data(), b.data(), n, isa) - expected) <= 1e-6 * magnitude);
      auto y = b;
      cpu::axpy(0.75f, a.data(), y.data(), n, isa);
      for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == Approx(b[i] + 0.75 * a[i]).margin(1e-6));
    }
  }
}

TEST_CASE("attend matches a double-precision reference on both code paths", "[cpu_ops]") {
  // A cache of 320 slots of `stride` floats with the head's columns at an
  // offset; positions map to slots in a scattered order, as paged blocks do.
  constexpr std::int64_t kSlots = 320;
  for (std::int64_t head_dim : {8, 64, 72, 100}) {
    const std::int64_t offset = 3;
    const std::int64_t stride = head_dim + 2 * offset + 1;
    auto keys = random_vector(static_cast<std::size_t>(kSlots * stride), 21, -2.0f, 2.0f);
    auto values = random_vector(static_cast<std::size_t>(kSlots * stride), 22);
    auto q = random_vector(static_cast<std::size_t>(head_dim), 23, -2.0f, 2.0f);
    std::vector<std::int64_t> slots(kSlots);
    for (std::int64_t p = 0; p < kSlots; ++p) slots[static_cast<std::size_t>(p)] = (p * 97 + 13) % kSlots;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    for (std::int64_t len : {1, 2, 7, 8, 9, 15, 16, 17, 63, 100, 129, 300}) {
      std::vector<double> weights(static_cast<std::size_t>(len));
      double max = -1e300;
      for (std::int64_t p = 0; p < len; ++p) {
        const float* k = keys.data() + slots[static_cast<std::size_t>(p)] * stride + offset;
        double s = 0;
        for (std::int64_t d = 0; d < head_dim; ++d) s += static_cast<double>(q[d]) * k[d];
        weights[static_cast<std::size_t>(p)] = s * scale;
        max = std::max(max, s * scale);
      }
      double sum = 0;
      for (auto& w : weights) sum += (w = std::exp(w - max));
      std::vector<double> expected(static_cast<std::size_t>(head_dim));
      for (std::int64_t p = 0; p < len; ++p) {
        const float* v = values.data() + slots[static_cast<std::size_t>(p)] * stride + offset;
        for (std::int64_t d = 0; d < head_dim; ++d) expected[d] += weights[static_cast<std::size_t>(p)] / sum * v[d];
      }
      for (Isa isa : testable_isas()) {
        INFO("head_dim=" << head_dim << " len=" << len << " " << isa_name(isa));
        std::vector<float> scores(static_cast<std::size_t>(len) + 8, -7.0f);
        // Sentinels on both sides of out catch writes past head_dim.
        std::vector<float> out(static_cast<std::size_t>(head_dim) + 16, 42.0f);
        cpu::attend(q.data(), keys.data() + offset, values.data() + offset, stride, slots.data(), len, head_dim, scale,
                    scores.data(), out.data() + 8, isa);
        for (std::int64_t p = 0; p < len; ++p)
          REQUIRE(scores[p] == Approx(weights[static_cast<std::size_t>(p)] / sum).margin(1e-6));
        for (std::size_t p = static_cast<std::size_t>(len); p < scores.size(); ++p) REQUIRE(scores[p] == -7.0f);
        for (std::int64_t d = 0; d < head_dim; ++d)
          REQUIRE(out[static_cast<std::size_t>(d) + 8] == Approx(expected[d]).margin(1e-5));
        for (std::size_t i = 0; i < 8; ++i) {
          REQUIRE(out[i] == 42.0f);
          REQUIRE(out[static_cast<std::size_t>(head_dim) + 8 + i] == 42.0f);
        }
        // The result depends only on the inputs: a second call is bit-identical.
        std::vector<float> again(static_cast<std::size_t>(head_dim));
        cpu::attend(q.data(), keys.data() + offset, values.data() + offset, stride, slots.data(), len, head_dim, scale,
                    scores.data(), again.data(), isa);
        REQUIRE(std::memcmp(again.data(), out.data() + 8, again.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("rmsnorm, softmax, silu_mul, add and scale match scalar references", "[cpu_ops]") {
  const std::int64_t n = 771;
  auto x = random_vector(n, 13, -4.0f, 4.0f);
  auto w = random_vector(n, 14);

  std::vector<float> out(n);
  cpu::rmsnorm(out.data(), x.data(), w.data(), n, 1e-5f);
  double ss = 0;
  for (float v : x) ss += static_cast<double>(v) * v;
  double inv = 1.0 / std::sqrt(ss / n + 1e-5);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(out[i] == Approx(x[i] * inv * w[i]).epsilon(1e-5).margin(1e-6));

  auto s = x;
  cpu::softmax(s.data(), n);
  double max = *std::max_element(x.begin(), x.end());
  double total = 0;
  for (float v : x) total += std::exp(v - max);
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    REQUIRE(s[i] == Approx(std::exp(x[i] - max) / total).epsilon(1e-5));
    sum += s[i];
  }
  CHECK(sum == Approx(1.0).epsilon(1e-5));
  std::vector<float> huge{1000.0f, 1000.0f};  // would overflow without the max subtraction
  cpu::softmax(huge.data(), 2);
  CHECK(huge[0] == 0.5f);

  for (Isa isa : testable_isas()) {
    INFO(isa_name(isa));
    // Past the exponent range too: silu(x) is x or 0 there.
    auto gx = x;
    gx[0] = 100.0f;
    gx[1] = -100.0f;
    gx[2] = 88.5f;
    gx[3] = -88.5f;
    gx[4] = 0.0f;
    auto g = gx;
    cpu::silu_mul(g.data(), w.data(), n, isa);
    for (std::int64_t i = 0; i < n; ++i) {
      double silu = gx[i] / (1.0 + std::exp(-static_cast<double>(gx[i])));
      REQUIRE(g[i] == Approx(silu * w[i]).epsilon(1e-5).margin(1e-6));
    }
    // Each element is computed the same way wherever a call's range falls.
    auto pieces = gx;
    const std::int64_t cuts[] = {0, 5, 13, 100, n};
    for (std::size_t c = 0; c + 1 < std::size(cuts); ++c) {
      cpu::silu_mul(pieces.data() + cuts[c], w.data() + cuts[c], cuts[c + 1] - cuts[c], isa);
    }
    REQUIRE(std::memcmp(pieces.data(), g.data(), g.size() * 4) == 0);
  }

  auto y = x;
  cpu::add(y.data(), w.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == x[i] + w[i]);
  cpu::scale(y.data(), -2.0f, n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == -2.0f * (x[i] + w[i]));
}

TEST_CASE("rope rotates adjacent pairs of every head", "[cpu_ops]") {
  const std::int64_t heads = 3;
  const std::int64_t head_dim = 8;
  const std::int64_t pos = 1234;
  const float theta = 10000.0f;
  auto v = random_vector(heads * head_dim, 15);
  auto rotated = v;
  cpu::rope(rotated.data(), heads, head_dim, pos, theta);
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t i = 0; i < head_dim / 2; ++i) {
      double angle = pos * std::pow(10000.0, -2.0 * i / head_dim);
      double a = v[h * head_dim + 2 * i];
      double b = v[h * head_dim + 2 * i + 1];
      CHECK(rotated[h * head_dim + 2 * i] == Approx(a * std::cos(angle) - b * std::sin(angle)).margin(1e-6));
      CHECK(rotated[h * head_dim + 2 * i + 1] == Approx(a * std::sin(angle) + b * std::cos(angle)).margin(1e-6));
    }
  }
  // Position 0 is the identity; pair 0 at position 1 turns by exactly 1 radian.
  auto same = v;
  cpu::rope(same.data(), heads, head_dim, 0, theta);
  CHECK(same == v);
  std::vector<float> unit{1.0f, 0.0f, 1.0f, 0.0f};
  cpu::rope(unit.data(), 1, 4, 1, theta);
  CHECK(unit[0] == Approx(std::cos(1.0)));
  CHECK(unit[1] == Approx(std::sin(1.0)));
  CHECK(unit[2] == Approx(std::cos(0.01)));
  CHECK(unit[3] == Approx(std::sin(0.01)));
}
