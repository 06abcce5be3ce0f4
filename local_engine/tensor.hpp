// Weight tensors as the engine sees them: a typed, row-major view into a
// memory-mapped model file (or into memory the model owns).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace tollgate::local_engine {

// Element types a weight may have. Quantised types store blocks of 32 values
// along a row, ggml's layout: Q8_0 = fp16 scale + 32 int8; Q4_0 = fp16 scale +
// 16 bytes of nibbles (low nibbles are values 0..15, high nibbles 16..31, each q-8).
enum class DType { f32, f16, bf16, q8_0, q4_0 };

inline constexpr std::int64_t kQuantBlock = 32;

struct BlockQ8_0 {
  std::uint16_t scale;  // fp16
  std::int8_t q[kQuantBlock];
};
static_assert(sizeof(BlockQ8_0) == 34);

struct BlockQ4_0 {
  std::uint16_t scale;  // fp16
  std::uint8_t q[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ4_0) == 18);

std::string_view dtype_name(DType type);
// Bytes one row of `cols` elements takes; cols must be a multiple of 32 for quantised types.
std::size_t row_bytes(DType type, std::int64_t cols);

// rows x cols, row-major: row r starts at data + r * row_bytes(type, cols).
// A matrix applied as y = W x has one row per output. Vectors (norm weights)
// are 1 x n.
struct Tensor {
  DType type = DType::f32;
  const void* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  // Q8_0 only, optional: the same rows rearranged once for the CPU matmul
  // (cpu::interleave_q8_0), which then reads these instead of the rows.
  const void* interleaved = nullptr;

  const std::byte* row(std::int64_t r) const {
    return static_cast<const std::byte*>(data) + static_cast<std::size_t>(r) * row_bytes(type, cols);
  }
  std::size_t bytes() const { return static_cast<std::size_t>(rows) * row_bytes(type, cols); }
  const float* f32() const { return static_cast<const float*>(data); }
};

// IEEE half and bfloat16 conversions (round to nearest even).
float fp16_to_f32(std::uint16_t h);
std::uint16_t f32_to_fp16(float f);
inline float bf16_to_f32(std::uint16_t h) {
  std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
std::uint16_t f32_to_bf16(float f);

}  // namespace tollgate::local_engine
