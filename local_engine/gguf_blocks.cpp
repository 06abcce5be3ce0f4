#include "local_engine/gguf_blocks.hpp"

#include <cstring>

#include "local_engine/tensor.hpp"

namespace tollgate::local_engine::gguf {
namespace {

constexpr BlockLayout kLayouts[] = {
    {3, "Q4_1", 32, 20},    {6, "Q5_0", 32, 22},    {7, "Q5_1", 32, 24},
    {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176}, {14, "Q6_K", 256, 210},
};

float half_at(const std::uint8_t* p) {
  std::uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return fp16_to_f32(h);
}

// Blocks of 32: fp16 d, [fp16 m], [32 high bits], 16 bytes of nibbles. Value
// j (< 16) is the low nibble of byte j, value j + 16 its high nibble; the
// fifth bit of value i is bit i of the high bits. Q5_0 centres on 16, the
// others add m.
void small_block(BlockType type, const std::uint8_t* b, float* y) {
  const float d = half_at(b);
  const bool with_min = type != BlockType::q5_0;
  const float m = with_min ? half_at(b + 2) : 0.0f;
  const bool five_bits = type != BlockType::q4_1;
  std::uint32_t high = 0;
  if (five_bits) std::memcpy(&high, b + (with_min ? 4 : 2), sizeof high);
  const std::uint8_t* qs = b + (with_min ? 4 : 2) + (five_bits ? 4 : 0);
  const int centre = type == BlockType::q5_0 ? 16 : 0;
  for (int j = 0; j < 16; ++j) {
    int lo = qs[j] & 0x0F;
    int hi = qs[j] >> 4;
    if (five_bits) {
      lo |= static_cast<int>((high >> j) & 1u) << 4;
      hi |= static_cast<int>((high >> (j + 16)) & 1u) << 4;
    }
    y[j] = static_cast<float>(lo - centre) * d + m;
    y[j + 16] = static_cast<float>(hi - centre) * d + m;
  }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block:
// sub-blocks 0-3 in the low six bits of bytes 0-3 (scales) and 4-7 (mins);
// 4-7 in the nibbles of bytes 8-11, their top two bits in the high bits of
// bytes 0-7.
void scale_min(int j, const std::uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K (d, dmin, 12 scale bytes, 128 nibble bytes) and Q5_K (the same with 32
// bytes of fifth bits before the nibbles): 8 sub-blocks of 32, value =
// d * scale * q - dmin * min. Each 64 values share 32 nibble bytes (low
// nibbles first) and, for Q5_K, two bits of each high byte.
void k_block(BlockType type, const std::uint8_t* b, float* y) {
  const float d = half_at(b);
  const float dmin = half_at(b + 2);
  const std::uint8_t* scales = b + 4;
  const bool five_bits = type == BlockType::q5_k;
  const std::uint8_t* high = b + 16;
  const std::uint8_t* qs = b + (five_bits ? 48 : 16);
  for (int pair = 0; pair < 4; ++pair) {
    for (int half = 0; half < 2; ++half) {
      int scale = 0;
      int min = 0;
      scale_min(2 * pair + half, scales, scale, min);
      const float ds = d * static_cast<float>(scale);
      const float dm = dmin * static_cast<float>(min);
      const int bit = 2 * pair + half;
      for (int l = 0; l < 32; ++l) {
        int q = half == 0 ? (qs[l] & 0x0F) : (qs[l] >> 4);
        if (five_bits && ((high[l] >> bit) & 1)) q += 16;
        *y++ = ds * static_cast<float>(q) - dm;
      }
    }
    qs += 32;
  }
}

// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one
// per 16 values), then fp16 d; value = d * scale * (q - 32). Each 128 values
// use 64 low bytes and 32 high bytes: value l + 32 k (k = 0..3) takes nibble
// k / 2 of low byte l + 32 (k % 2) and bits 2k, 2k+1 of high byte l.
void q6_k_block(const std::uint8_t* b, float* y) {
  const std::uint8_t* ql = b;
  const std::uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const std::int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int n = 0; n < 2; ++n) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      for (int k = 0; k < 4; ++k) {
        const std::uint8_t low = ql[l + 32 * (k % 2)];
        const int nibble = k < 2 ? (low & 0x0F) : (low >> 4);
        const int q = (nibble | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
        y[l + 32 * k] = d * static_cast<float>(sc[is + 2 * k]) * static_cast<float>(q);
      }
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

const BlockLayout& layout(BlockType type) { return kLayouts[static_cast<std::size_t>(type)]; }

std::optional<BlockType> block_type_of(std::uint32_t ggml_id) {
  for (std::size_t i = 0; i < std::size(kLayouts); ++i) {
    if (kLayouts[i].ggml_id == ggml_id) return static_cast<BlockType>(i);
  }
  return std::nullopt;
}

void dequantize_blocks(BlockType type, const std::byte* blocks, std::int64_t cols, float* out) {
  const BlockLayout& l = layout(type);
  const auto* b = reinterpret_cast<const std::uint8_t*>(blocks);
  for (std::int64_t i = 0; i < cols / l.values; ++i, b += l.bytes, out += l.values) {
    switch (type) {
      case BlockType::q4_1:
      case BlockType::q5_0:
      case BlockType::q5_1:
        small_block(type, b, out);
        break;
      case BlockType::q4_k:
      case BlockType::q5_k:
        k_block(type, b, out);
        break;
      case BlockType::q6_k:
        q6_k_block(b, out);
        break;
    }
  }
}

}  // namespace tollgate::local_engine::gguf
