// Text <-> token ids for a Vocabulary: SentencePiece-style BPE over scores with
// byte fallback, and GPT-2 byte-level BPE over ranked merges.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "local_engine/vocabulary.hpp"

namespace tollgate::local_engine {

// A run of text to encode, and whether special-token text inside it counts
// (template markup) or is ordinary text (what a user wrote).
struct TextSegment {
  std::string text;
  bool parse_special = false;
};

class Tokenizer {
 public:
  // Throws std::invalid_argument for a vocabulary it cannot use.
  explicit Tokenizer(Vocabulary vocab);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text to ids. With `parse_special`, the text of control and user-defined
  // tokens ("<s>", "<|eot_id|>", "<|im_start|>") becomes their ids; without
  // it such text is ordinary text.
  std::vector<std::int32_t> encode(std::string_view text, bool add_bos, bool parse_special = false) const;
  // The segments encoded as one text (BPE merges across their boundaries),
  // special tokens recognised only in segments that allow them.
  std::vector<std::int32_t> encode(const std::vector<TextSegment>& segments, bool add_bos) const;

  // The bytes one token stands for: byte pieces give their byte, "▁" a space,
  // GPT-2 pieces their decoded bytes, user-defined tokens their text,
  // control, unknown and unused tokens nothing. May be part of a UTF-8
  // character.
  std::string token_bytes(std::int32_t id) const;

  // Whole-sequence decoding (SentencePiece drops the leading space of a
  // piece that directly follows BOS); invalid UTF-8 becomes U+FFFD.
  std::string decode(const std::vector<std::int32_t>& ids) const;

  bool ends_generation(std::int32_t id) const;  // EOS, or end of turn
  const Vocabulary& vocabulary() const;
  std::int32_t size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of ids into text that is always valid UTF-8: the bytes of a
// character split across tokens wait for the rest.
class TextStream {
 public:
  // `after_bos`: the first token directly follows BOS (an empty prompt), so a
  // SentencePiece leading space is dropped, as the reference generator does.
  TextStream(const Tokenizer& tokenizer, bool after_bos);
  // The text that became complete with this token (possibly empty).
  std::string push(std::int32_t id);
  // What is still held back at the end, invalid bytes as U+FFFD.
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  bool strip_space_;
  std::string pending_;
};

// `bytes` as valid UTF-8, each ill-formed or incomplete sequence as U+FFFD.
std::string valid_utf8(std::string_view bytes);

// A llama2.c tokenizer file (max_token_length, then per token: float score,
// int32 length, bytes) as a SentencePiece vocabulary; ids 0/1/2 are unk/BOS/EOS
// and "<0xAB>" pieces bytes. Throws std::runtime_error for a malformed file.
Vocabulary load_llama2c_tokenizer(const std::string& path);

// GPT-2 byte-level BPE's pre-tokenizer split for Vocabulary::pre ("llama-bpe"
// or "llama3", "qwen2", anything else GPT-2's): the words merges apply within.
std::vector<std::string_view> pre_tokenize(std::string_view text, std::string_view pre);

}  // namespace tollgate::local_engine
