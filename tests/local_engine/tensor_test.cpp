#include "local_engine/tensor.hpp"

#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>

using namespace tollgate::local_engine;

TEST_CASE("every finite half survives a round trip through f32", "[tensor]") {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    auto half = static_cast<std::uint16_t>(h);
    if ((half & 0x7c00u) == 0x7c00u && (half & 0x3ffu) != 0) continue;  // nan
    REQUIRE(f32_to_fp16(fp16_to_f32(half)) == half);
  }
}

TEST_CASE("fp16_to_f32 decodes known values", "[tensor]") {
  CHECK(fp16_to_f32(0x3c00) == 1.0f);
  CHECK(fp16_to_f32(0xc000) == -2.0f);
  CHECK(fp16_to_f32(0x7bff) == 65504.0f);
  CHECK(fp16_to_f32(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(fp16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(fp16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(std::signbit(fp16_to_f32(0x8000)));
  CHECK(fp16_to_f32(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(fp16_to_f32(0x7e00)));
}

TEST_CASE("f32_to_fp16 rounds to nearest, ties to even", "[tensor]") {
  // 1 + 2^-11 is halfway between 1 (even) and 1 + 2^-10.
  CHECK(f32_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  CHECK(f32_to_fp16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3c01);
  // 1 + 3 * 2^-11 is halfway between 0x3c01 (odd) and 0x3c02 (even).
  CHECK(f32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  CHECK(f32_to_fp16(-1.0f - 3 * std::ldexp(1.0f, -11)) == 0xbc02);
  // Subnormal ties: 2^-25 is halfway between 0 and the smallest subnormal.
  CHECK(f32_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(f32_to_fp16(std::ldexp(3.0f, -25)) == 0x0002);
  CHECK(f32_to_fp16(std::ldexp(1.0f, -14)) == 0x0400);
  // Overflow: 65520 is halfway past the largest half and rounds to infinity.
  CHECK(f32_to_fp16(65519.0f) == 0x7bff);
  CHECK(f32_to_fp16(65520.0f) == 0x7c00);
  CHECK(f32_to_fp16(-1e30f) == 0xfc00);
  CHECK(f32_to_fp16(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK((f32_to_fp16(std::numeric_limits<float>::quiet_NaN()) & 0x7fffu) > 0x7c00u);
}

TEST_CASE("bf16 round trips and rounds to nearest even", "[tensor]") {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    auto b = static_cast<std::uint16_t>(h);
    if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0) continue;  // nan
    REQUIRE(f32_to_bf16(bf16_to_f32(b)) == b);
  }
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  CHECK(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);      // tie, to even
  CHECK(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);  // tie, to even
  CHECK(f32_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)) == 0x3f81);
  // Just below the tie between the largest bf16 (odd) and 2^128: stays finite;
  // the tie itself rounds to even, which is infinity.
  CHECK(f32_to_bf16(std::bit_cast<float>(0x7f7f7fffu)) == 0x7f7f);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x7f7f8000u)) == 0x7f80);
  auto nan = f32_to_bf16(std::bit_cast<float>(0x7f800001u));  // payload only in the dropped bits
  CHECK(std::isnan(bf16_to_f32(nan)));
}

TEST_CASE("row sizes and row addressing follow the block layouts", "[tensor]") {
  CHECK(row_bytes(DType::f32, 96) == 384);
  CHECK(row_bytes(DType::f16, 96) == 192);
  CHECK(row_bytes(DType::bf16, 96) == 192);
  CHECK(row_bytes(DType::q8_0, 96) == 3 * 34);
  CHECK(row_bytes(DType::q4_0, 96) == 3 * 18);
  CHECK(dtype_name(DType::q4_0) == "Q4_0");
  alignas(4) std::byte storage[10 * 54] = {};
  Tensor t{DType::q4_0, storage, 10, 96};
  CHECK(t.row(3) == storage + 3 * 54);
  CHECK(t.bytes() == 540);
}
