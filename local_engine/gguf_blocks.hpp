// ggml block types the engine reads from GGUF files but does not compute in:
// Q4_1, Q5_0, Q5_1 (blocks of 32) and the K-quants Q4_K, Q5_K, Q6_K (super-
// blocks of 256, as in the Q4_K_M and Q5_K_M files most models ship in). The
// loader decodes their matrices once and stores them as Q8_0, whose step is
// far finer than theirs, so the fast Q8_0 kernels serve them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace tollgate::local_engine::gguf {

enum class BlockType : std::uint8_t { q4_1, q5_0, q5_1, q4_k, q5_k, q6_k };

struct BlockLayout {
  std::uint32_t ggml_id;  // the GGUF tensor type id
  std::string_view name;  // as ggml names it
  std::int64_t values;    // per block
  std::size_t bytes;      // per block
};

const BlockLayout& layout(BlockType type);
std::optional<BlockType> block_type_of(std::uint32_t ggml_id);

// Decodes one row of `cols` values (a multiple of the type's block) from its
// blocks, with ggml's layouts and rounding.
void dequantize_blocks(BlockType type, const std::byte* blocks, std::int64_t cols, float* out);

}  // namespace tollgate::local_engine::gguf
