// A tokenizer's vocabulary as a model file carries it (GGUF tokenizer.ggml.*,
// or a llama2.c tokenizer file), before any tokenizer is built from it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tollgate::local_engine {

enum class TokenizerKind {
  sentencepiece,  // GGUF tokenizer.ggml.model = "llama": BPE over scores, byte fallback
  gpt2,           // GGUF "gpt2": byte-level BPE with ranked merges
};

// GGUF tokenizer.ggml.token_type values.
enum class TokenType : std::int32_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

struct Vocabulary {
  TokenizerKind kind = TokenizerKind::sentencepiece;
  // sentencepiece: pieces use U+2581 ("▁") for a space, as SentencePiece and
  // GGUF do (the llama2.c loader converts its plain spaces); byte pieces are
  // "<0xAB>". gpt2: pieces in GPT-2's byte-to-unicode encoding.
  std::vector<std::string> pieces;
  std::vector<float> scores;        // sentencepiece merge priority (higher first); may be empty for gpt2
  std::vector<TokenType> types;     // empty: all normal (ids that look like "<0xAB>" are bytes)
  std::vector<std::string> merges;  // gpt2: "a b", in rank order
  std::int32_t bos = 1;
  std::int32_t eos = 2;
  std::int32_t unk = 0;
  std::optional<std::int32_t> eot;  // end of turn (llama3 <|eot_id|>, chatml <|im_end|>), also ends generation
  bool add_bos = true;
  bool add_space_prefix = true;  // sentencepiece: prepend "▁" to the text
  std::string pre;               // gpt2 pre-tokenizer: "llama-bpe" (llama3), "qwen2", "default", ...
  std::string chat_template;     // GGUF tokenizer.chat_template (Jinja source), may be empty
};

}  // namespace tollgate::local_engine
