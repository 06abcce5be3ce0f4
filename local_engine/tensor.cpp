#include "local_engine/tensor.hpp"

#include <cassert>

namespace tollgate::local_engine {

std::string_view dtype_name(DType type) {
  switch (type) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::q8_0:
      return "Q8_0";
    case DType::q4_0:
      return "Q4_0";
  }
  return "?";
}

std::size_t row_bytes(DType type, std::int64_t cols) {
  auto n = static_cast<std::size_t>(cols);
  switch (type) {
    case DType::f32:
      return n * 4;
    case DType::f16:
    case DType::bf16:
      return n * 2;
    case DType::q8_0:
      assert(cols % kQuantBlock == 0);
      return n / kQuantBlock * sizeof(BlockQ8_0);
    case DType::q4_0:
      assert(cols % kQuantBlock == 0);
      return n / kQuantBlock * sizeof(BlockQ4_0);
  }
  return 0;
}

float fp16_to_f32(std::uint16_t h) {
  std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf or nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalise it.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    bits = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

std::uint16_t f32_to_fp16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  std::uint32_t sign = (bits >> 16) & 0x8000u;
  std::uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past the largest half
  if (abs < 0x38800000u) {
    // Subnormal or zero half: add the magic constant so the FPU rounds for us.
    float magic;
    std::uint32_t magic_bits = 0x3f000000u;  // 0.5f: shifts the value into the low mantissa bits
    std::memcpy(&magic, &magic_bits, sizeof magic);
    float a;
    std::memcpy(&a, &abs, sizeof a);
    a += magic;
    std::uint32_t r;
    std::memcpy(&r, &a, sizeof r);
    return static_cast<std::uint16_t>(sign | (r - magic_bits));
  }
  std::uint32_t mantissa_odd = (abs >> 13) & 1u;
  abs += 0xc8000fffu + mantissa_odd;  // rebias the exponent (-112 << 23) and round to nearest even
  return static_cast<std::uint16_t>(sign | (abs >> 13));
}

std::uint16_t f32_to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // quiet nan
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

}  // namespace tollgate::local_engine
