// The local engine's tokenizer (local_engine/tokenizer.hpp) with the real
// vocabularies in ../shared/models: the input encoded as text, and ids taken
// from its bytes decoded whole and streamed. Input: one byte of options
// (vocabulary, BOS, special tokens), then the text.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "local_engine/tokenizer.hpp"

namespace {

namespace engine = tollgate::local_engine;

const std::string kModels = TOLLGATE_SOURCE_DIR "/../shared/models/";

// Loaded once: a missing file throws here, which fails the run loudly.
const engine::Tokenizer& tokenizer(bool large) {
  static const engine::Tokenizer tok512(engine::load_llama2c_tokenizer(kModels + "tok512.bin"));
  static const engine::Tokenizer llama2(engine::load_llama2c_tokenizer(kModels + "llama2-tokenizer.bin"));
  return large ? llama2 : tok512;
}

bool is_valid_utf8(const std::string& s) { return engine::valid_utf8(s) == s; }

void check_encode(const engine::Tokenizer& tok, std::string_view text, bool add_bos, bool parse_special) {
  auto ids = tok.encode(text, add_bos, parse_special);
  for (auto id : ids) {
    if (id < 0 || id >= tok.size()) std::abort();
  }
  auto decoded = tok.decode(ids);
  if (!is_valid_utf8(decoded)) std::abort();
  // Byte fallback makes every text encodable: ordinary text comes back as it
  // was, except SentencePiece's space mark "▁", which decodes to a space.
  const bool ordinary = add_bos && !parse_special && text.find("\xE2\x96\x81") == std::string_view::npos;
  if (ordinary && is_valid_utf8(std::string(text)) && decoded != text) std::abort();
}

// Any ids, in range or not: decoding never fails, and streaming them gives
// the same text as decoding them whole.
void check_decode(const engine::Tokenizer& tok, std::string_view bytes) {
  std::vector<std::int32_t> ids;
  for (std::size_t i = 0; i + 1 < bytes.size(); i += 2) {
    auto raw =
        static_cast<std::int32_t>(static_cast<unsigned char>(bytes[i]) | static_cast<unsigned char>(bytes[i + 1]) << 8);
    ids.push_back(raw % (tok.size() + 16) - 8);
  }
  auto whole = tok.decode(ids);
  if (!is_valid_utf8(whole)) std::abort();
  engine::TextStream stream(tok, false);
  std::string streamed;
  for (auto id : ids) streamed += stream.push(id);
  streamed += stream.finish();
  if (!is_valid_utf8(streamed) || streamed != whole) std::abort();
}

// The GPT-2 pre-tokenizers split a text into words without losing a byte.
void check_pre_tokenize(std::string_view text) {
  for (auto pre : {"llama-bpe", "qwen2", "default"}) {
    std::string joined;
    for (auto word : engine::pre_tokenize(text, pre)) {
      if (word.empty()) std::abort();
      joined += word;
    }
    if (joined != text) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t options = data[0];
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  const auto& tok = tokenizer(options & 1);
  check_encode(tok, text, options & 2, options & 4);
  check_decode(tok, text);
  check_pre_tokenize(text);
  return 0;
}
