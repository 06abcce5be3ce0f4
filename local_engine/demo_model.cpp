// write_random_llama_gguf: a random-weight llama GGUF with a built-in
// byte-fallback SentencePiece vocabulary, for demos and benchmarks; and the
// demo model, one such file.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include "local_engine/gguf.hpp"
#include "local_engine/model.hpp"

namespace tollgate::local_engine {
namespace {

constexpr std::string_view kSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's space

constexpr std::string_view kCommonWords[] = {
    "the",  "and",   "to",     "of",    "a",      "in",    "is",     "it",    "you",   "that",  "he",     "was",
    "for",  "on",    "are",    "as",    "with",   "his",   "they",   "at",    "be",    "this",  "have",   "from",
    "or",   "one",   "had",    "by",    "word",   "but",   "not",    "what",  "all",   "were",  "we",     "when",
    "your", "can",   "said",   "there", "use",    "an",    "each",   "which", "she",   "do",    "how",    "their",
    "if",   "will",  "up",     "other", "about",  "out",   "many",   "then",  "them",  "these", "so",     "some",
    "her",  "would", "make",   "like",  "him",    "into",  "time",   "has",   "look",  "two",   "more",   "write",
    "go",   "see",   "number", "no",    "way",    "could", "people", "my",    "than",  "first", "water",  "been",
    "call", "who",   "its",    "now",   "find",   "long",  "down",   "day",   "did",   "get",   "come",   "made",
    "may",  "part",  "once",   "upon",  "little", "girl",  "boy",    "named", "happy", "play",  "friend", "big",
};

// The vocabulary: <unk>, <s>, </s>, the 256 byte pieces, then normal pieces
// (characters, "▁"-prefixed letters, common words, letter pairs and triples,
// ...) with descending scores until there are `size` pieces.
struct DemoVocabulary {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<std::int32_t> types;
};

DemoVocabulary demo_vocabulary(std::int64_t size) {
  DemoVocabulary v;
  auto add = [&](std::string piece, TokenType type, float score) {
    v.pieces.push_back(std::move(piece));
    v.types.push_back(static_cast<std::int32_t>(type));
    v.scores.push_back(score);
  };
  add("<unk>", TokenType::unknown, 0.0f);
  add("<s>", TokenType::control, 0.0f);
  add("</s>", TokenType::control, 0.0f);
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) add(std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">", TokenType::byte, 0.0f);

  std::unordered_set<std::string> seen;
  auto normal = [&](std::string piece) {
    if (static_cast<std::int64_t>(v.pieces.size()) >= size || !seen.insert(piece).second) return;
    add(std::move(piece), TokenType::normal, -static_cast<float>(seen.size()));
  };
  normal(std::string(kSpace));
  for (char c = '!'; c <= '~'; ++c) normal(std::string(1, c));
  for (char c = 'a'; c <= 'z'; ++c) normal(std::string(kSpace) + c);
  for (char c = 'A'; c <= 'Z'; ++c) normal(std::string(kSpace) + c);
  for (auto w : kCommonWords) {
    normal(std::string(kSpace) + std::string(w));
    normal(std::string(w));
  }
  // Letter strings of growing length, plain and "▁"-prefixed, until full.
  std::vector<std::string> strings = {""};
  while (static_cast<std::int64_t>(v.pieces.size()) < size) {
    std::vector<std::string> longer;
    longer.reserve(strings.size() * 26);
    for (const auto& s : strings) {
      for (char c = 'a'; c <= 'z'; ++c) longer.push_back(s + c);
    }
    strings = std::move(longer);
    if (strings.front().size() < 2) continue;
    for (const auto& s : strings) normal(s);
    for (const auto& s : strings) normal(std::string(kSpace) + s);
  }
  return v;
}

// splitmix64: fast, and plenty for weights nobody trains.
class RandomStream {
 public:
  explicit RandomStream(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() {  // [-1, 1)
    return static_cast<float>(next() >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }

 private:
  std::uint64_t state_;
};

std::uint32_t llama_file_type(DType type) {
  switch (type) {
    case DType::f32:
      return 0;  // LLAMA_FTYPE_ALL_F32
    case DType::f16:
      return 1;  // MOSTLY_F16
    case DType::q4_0:
      return 2;  // MOSTLY_Q4_0
    case DType::q8_0:
      return 7;  // MOSTLY_Q8_0
    case DType::bf16:
      return 32;  // MOSTLY_BF16
  }
  return 0;
}

}  // namespace

void write_random_llama_gguf(const std::string& path, const Hyperparams& params, DType weight_type, std::uint64_t seed,
                             const std::string& name) {
  const Hyperparams& p = params;
  if (p.dim <= 0 || p.hidden_dim <= 0 || p.n_layers <= 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 ||
      p.context_length <= 0 || p.dim % p.n_heads != 0 || p.n_heads % p.n_kv_heads != 0 || p.head_dim() % 2 != 0) {
    throw std::invalid_argument("random model: inconsistent hyperparameters");
  }
  if (p.vocab_size < 259) throw std::invalid_argument("random model: vocab_size must be at least 259 (3 + 256 bytes)");
  bool quantised = weight_type == DType::q8_0 || weight_type == DType::q4_0;
  if (quantised && (p.dim % kQuantBlock != 0 || p.hidden_dim % kQuantBlock != 0)) {
    throw std::invalid_argument("random model: quantised weights need dim and hidden_dim to be multiples of 32");
  }

  gguf::Writer w;
  w.add("general.architecture", gguf::Value::string("llama"));
  std::string label = name.empty() ? "random-weight demo" : name + " (random-weight demo)";
  w.add("general.name", gguf::Value::string(label));
  w.add("general.description",
        gguf::Value::string("Random weights for demos and benchmarks: the output is gibberish by design."));
  w.add("general.file_type", gguf::Value::u32(llama_file_type(weight_type)));
  w.add("llama.context_length", gguf::Value::u32(static_cast<std::uint32_t>(p.context_length)));
  w.add("llama.embedding_length", gguf::Value::u32(static_cast<std::uint32_t>(p.dim)));
  w.add("llama.feed_forward_length", gguf::Value::u32(static_cast<std::uint32_t>(p.hidden_dim)));
  w.add("llama.block_count", gguf::Value::u32(static_cast<std::uint32_t>(p.n_layers)));
  w.add("llama.attention.head_count", gguf::Value::u32(static_cast<std::uint32_t>(p.n_heads)));
  w.add("llama.attention.head_count_kv", gguf::Value::u32(static_cast<std::uint32_t>(p.n_kv_heads)));
  w.add("llama.rope.dimension_count", gguf::Value::u32(static_cast<std::uint32_t>(p.head_dim())));
  w.add("llama.rope.freq_base", gguf::Value::f32(p.rope_theta));
  w.add("llama.attention.layer_norm_rms_epsilon", gguf::Value::f32(p.rms_eps));
  {
    DemoVocabulary vocab = demo_vocabulary(p.vocab_size);
    w.add("tokenizer.ggml.model", gguf::Value::string("llama"));
    w.add("tokenizer.ggml.tokens", gguf::Value::strings(vocab.pieces));
    w.add("tokenizer.ggml.scores", gguf::Value::floats(vocab.scores));
    w.add("tokenizer.ggml.token_type", gguf::Value::int32s(vocab.types));
  }
  w.add("tokenizer.ggml.unknown_token_id", gguf::Value::u32(0));
  w.add("tokenizer.ggml.bos_token_id", gguf::Value::u32(1));
  w.add("tokenizer.ggml.eos_token_id", gguf::Value::u32(2));
  w.add("tokenizer.ggml.add_bos_token", gguf::Value::boolean(true));
  w.add("tokenizer.ggml.add_space_prefix", gguf::Value::boolean(true));

  // Tensor order as llama.cpp writes it; norms are always F32 and all ones.
  // Uniform in [-a, a) has standard deviation a/sqrt(3): a = sqrt(3/cols)
  // keeps y = W x at the scale of x.
  std::vector<float> amplitude;  // per tensor; 0 for norms
  std::vector<std::int64_t> row_length;
  auto tensor = [&](std::string tensor_name, std::int64_t rows, std::int64_t cols) {
    w.add_tensor(std::move(tensor_name), {cols, rows}, weight_type);
    amplitude.push_back(std::sqrt(3.0f / static_cast<float>(cols)));
    row_length.push_back(cols);
  };
  auto norm = [&](std::string tensor_name) {
    w.add_tensor(std::move(tensor_name), {p.dim}, DType::f32);
    amplitude.push_back(0.0f);
    row_length.push_back(p.dim);
  };
  std::int64_t kv_dim = p.n_kv_heads * p.head_dim();
  tensor("token_embd.weight", p.vocab_size, p.dim);
  norm("output_norm.weight");
  tensor("output.weight", p.vocab_size, p.dim);
  for (std::int64_t l = 0; l < p.n_layers; ++l) {
    std::string blk = "blk." + std::to_string(l) + ".";
    norm(blk + "attn_norm.weight");
    tensor(blk + "attn_q.weight", p.dim, p.dim);
    tensor(blk + "attn_k.weight", kv_dim, p.dim);
    tensor(blk + "attn_v.weight", kv_dim, p.dim);
    tensor(blk + "attn_output.weight", p.dim, p.dim);
    norm(blk + "ffn_norm.weight");
    tensor(blk + "ffn_gate.weight", p.hidden_dim, p.dim);
    tensor(blk + "ffn_down.weight", p.dim, p.hidden_dim);
    tensor(blk + "ffn_up.weight", p.hidden_dim, p.dim);
  }

  // One stream per tensor, so a tensor's values depend only on the seed and
  // its position, not on the shapes before it.
  std::size_t current = amplitude.size();
  RandomStream random(seed);
  w.write(path, [&](std::size_t t, std::int64_t, float* out) {
    if (t != current) {
      current = t;
      random = RandomStream(seed ^ (0x5851f42d4c957f2dull * (t + 1)));
    }
    float a = amplitude[t];
    for (std::int64_t i = 0; i < row_length[t]; ++i) out[i] = a == 0.0f ? 1.0f : a * random.uniform();
  });
}

void write_demo_model(const std::string& path) {
  // Small enough to write and load in a blink, big enough to look like a model.
  Hyperparams p;
  p.dim = 256;
  p.hidden_dim = 768;
  p.n_layers = 4;
  p.n_heads = 8;
  p.n_kv_heads = 4;
  p.vocab_size = 1024;
  p.context_length = 2048;
  // Written aside and renamed, so a gateway starting beside another never reads half a file.
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  auto partial = path + ".partial-" + std::to_string(::getpid());
  write_random_llama_gguf(partial, p, DType::q8_0, 42, "tollgate-demo");
  std::filesystem::rename(partial, path);
}

}  // namespace tollgate::local_engine
