#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "local_engine/cpu_ops.hpp"
#include "local_engine/gguf.hpp"
#include "local_engine/model.hpp"

namespace tollgate::local_engine {
namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using gguf::Value;

const std::string kModels = TOLLGATE_SOURCE_DIR "/../shared/models/";
const std::string kStoriesGguf = kModels + "stories260K.gguf";
const std::string kStoriesBin = kModels + "stories260K.bin";
const std::string kTok512 = kModels + "tok512.bin";
const std::string kLlama2Tokenizer = kModels + "llama2-tokenizer.bin";

class ScratchDir {
 public:
  ScratchDir() : path_(fs::temp_directory_path() / ("tollgate-model-test-" + std::to_string(::getpid()))) {
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string load_error(const std::string& path, const std::string& tokenizer = {}) {
  try {
    load_model(path, tokenizer);
  } catch (const ModelError& e) {
    return e.what();
  }
  return "no error";
}

void check_shape(const Tensor& t, std::int64_t rows, std::int64_t cols) {
  CHECK(t.rows == rows);
  CHECK(t.cols == cols);
  CHECK(t.data != nullptr);
}

void check_stories_shapes(const Model& m) {
  check_shape(m.token_embedding, 512, 64);
  check_shape(m.output_norm, 1, 64);
  check_shape(m.output, 512, 64);
  REQUIRE(m.layers.size() == 5);
  for (const auto& l : m.layers) {
    check_shape(l.attn_norm, 1, 64);
    check_shape(l.wq, 64, 64);
    check_shape(l.wk, 32, 64);
    check_shape(l.wv, 32, 64);
    check_shape(l.wo, 64, 64);
    check_shape(l.ffn_norm, 1, 64);
    check_shape(l.w_gate, 172, 64);
    check_shape(l.w_down, 64, 172);
    check_shape(l.w_up, 172, 64);
    for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_down, &l.w_up}) {
      CHECK(t->type == DType::f32);
    }
  }
}

void check_stories_hyperparams(const Hyperparams& p, std::int64_t context) {
  CHECK(p.architecture == "llama");
  CHECK(p.dim == 64);
  CHECK(p.hidden_dim == 172);
  CHECK(p.n_layers == 5);
  CHECK(p.n_heads == 8);
  CHECK(p.n_kv_heads == 4);
  CHECK(p.head_dim() == 8);
  CHECK(p.vocab_size == 512);
  CHECK(p.context_length == context);
  CHECK(p.rope_theta == 10000.0f);
  CHECK(p.rms_eps == Approx(1e-5f));
}

bool same_floats(const Tensor& a, const Tensor& b) {
  return a.rows == b.rows && a.cols == b.cols && a.type == DType::f32 && b.type == DType::f32 &&
         std::memcmp(a.data, b.data, a.bytes()) == 0;
}

TEST_CASE("stories260K.gguf loads with the README's hyperparameters and shapes", "[model]") {
  Model m = load_model(kStoriesGguf);
  check_stories_hyperparams(m.params, 128);
  check_stories_shapes(m);
  CHECK(m.name == "llama");
  CHECK(m.file_type == "F32");
  CHECK(m.output.data != m.token_embedding.data);  // the converter wrote a separate output.weight
  CHECK(m.storage != nullptr);

  const Vocabulary& v = m.vocab;
  CHECK(v.kind == TokenizerKind::sentencepiece);
  REQUIRE(v.pieces.size() == 512);
  CHECK(v.pieces[0] == "<unk>");
  CHECK(v.pieces[1] == "<s>");
  CHECK(v.pieces[2] == "</s>");
  CHECK(v.pieces[3] == "<0x00>");
  CHECK(v.pieces[258] == "<0xFF>");
  REQUIRE(v.scores.size() == 512);
  REQUIRE(v.types.size() == 512);
  CHECK(v.types[0] == TokenType::unknown);
  CHECK(v.types[1] == TokenType::control);
  CHECK(v.types[3] == TokenType::byte);
  CHECK(v.types[300] == TokenType::normal);
  CHECK(v.bos == 1);
  CHECK(v.eos == 2);
  CHECK(v.unk == 0);
  CHECK_FALSE(v.eot);
  CHECK(v.add_bos);
  CHECK(v.add_space_prefix);
  CHECK(v.chat_template.empty());
}

TEST_CASE("stories260K.bin loads with tok512.bin, the classifier is the shared embedding", "[model]") {
  Model m = load_model(kStoriesBin, kTok512);
  check_stories_hyperparams(m.params, 512);
  check_stories_shapes(m);
  CHECK(m.name == "stories260K");
  CHECK(m.file_type == "F32");
  CHECK(m.output.data == m.token_embedding.data);
  CHECK(m.vocab.pieces.size() == 512);
  // The first weight follows the 28-byte header.
  std::ifstream in(kStoriesBin, std::ios::binary);
  in.seekg(28);
  float first = 0;
  in.read(reinterpret_cast<char*>(&first), sizeof first);
  CHECK(m.token_embedding.f32()[0] == first);
}

TEST_CASE("stories260K.gguf and .bin hold the same weights", "[model]") {
  Model g = load_model(kStoriesGguf);
  Model b = load_model(kStoriesBin, kTok512);
  CHECK(same_floats(g.token_embedding, b.token_embedding));
  CHECK(same_floats(g.output, b.output));
  CHECK(same_floats(g.output, b.token_embedding));
  CHECK(same_floats(g.output_norm, b.output_norm));
  for (std::size_t l : {std::size_t{0}, std::size_t{3}, std::size_t{4}}) {
    INFO("layer " << l);
    CHECK(same_floats(g.layers[l].attn_norm, b.layers[l].attn_norm));
    CHECK(same_floats(g.layers[l].wq, b.layers[l].wq));
    CHECK(same_floats(g.layers[l].wk, b.layers[l].wk));
    CHECK(same_floats(g.layers[l].wv, b.layers[l].wv));
    CHECK(same_floats(g.layers[l].wo, b.layers[l].wo));
    CHECK(same_floats(g.layers[l].ffn_norm, b.layers[l].ffn_norm));
    CHECK(same_floats(g.layers[l].w_gate, b.layers[l].w_gate));
    CHECK(same_floats(g.layers[l].w_down, b.layers[l].w_down));
    CHECK(same_floats(g.layers[l].w_up, b.layers[l].w_up));
  }
  // Different layers really are different data (the comparison can fail).
  CHECK_FALSE(same_floats(g.layers[0].wq, b.layers[1].wq));
  // The vocabularies agree too.
  CHECK(g.vocab.pieces == b.vocab.pieces);
}

TEST_CASE("A GGUF model with a llama2.c tokenizer override takes that tokenizer", "[model]") {
  Model m = load_model(kStoriesGguf, kTok512);
  CHECK(m.vocab.pieces.size() == 512);
  CHECK(m.vocab.pieces == load_model(kStoriesBin, kTok512).vocab.pieces);
  CHECK_THAT(load_error(kStoriesGguf, kLlama2Tokenizer), Contains("32000 tokens") && Contains("512"));
}

TEST_CASE("llama2.c checkpoints: missing tokenizer, wrong tokenizer, truncated or padded files", "[model]") {
  CHECK_THAT(load_error(kStoriesBin), Contains("needs a tokenizer"));
  CHECK_THAT(load_error(kStoriesBin, kLlama2Tokenizer), Contains("32000 tokens"));
  CHECK_THAT(load_error(kStoriesBin, kModels + "no-such-tokenizer.bin"), Contains("no-such-tokenizer.bin"));

  ScratchDir dir;
  std::ifstream in(kStoriesBin, std::ios::binary);
  std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  REQUIRE(bytes.size() == 1056540);
  std::string cut = dir.file("cut.bin");
  for (std::size_t n :
       {std::size_t{1}, std::size_t{27}, std::size_t{28}, std::size_t{1000}, bytes.size() - 4, bytes.size() - 1}) {
    std::ofstream(cut, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(n));
    std::string error = load_error(cut, kTok512);
    INFO("cut at " << n << ": " << error);
    CHECK(error != "no error");
    CHECK_THAT(error, Contains(cut));
  }
  std::ofstream(cut, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(1000));
  CHECK_THAT(load_error(cut, kTok512), Contains("needs exactly 1056540") && Contains("truncated"));
  {
    std::ofstream out(cut, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.write("xxxx", 4);
  }
  CHECK_THAT(load_error(cut, kTok512), Contains("trailing data"));
  // A negative vocab_size asks for a separate classifier the file does not have.
  std::vector<char> unshared = bytes;
  std::int32_t negative = -512;
  std::memcpy(unshared.data() + 20, &negative, sizeof negative);
  std::ofstream(cut, std::ios::binary | std::ios::trunc)
      .write(unshared.data(), static_cast<std::streamsize>(unshared.size()));
  CHECK_THAT(load_error(cut, kTok512), Contains("separate classifier") && Contains("truncated"));
  // Absurd header values.
  std::vector<char> absurd = bytes;
  std::int32_t huge = 0x7fffffff;
  std::memcpy(absurd.data(), &huge, sizeof huge);
  std::ofstream(cut, std::ios::binary | std::ios::trunc)
      .write(absurd.data(), static_cast<std::streamsize>(absurd.size()));
  CHECK_THAT(load_error(cut, kTok512), Contains("dim = 2147483647 is out of range"));
}

TEST_CASE("A llama2.c checkpoint with a separate classifier points output at wcls", "[model]") {
  ScratchDir dir;
  std::ifstream in(kStoriesBin, std::ios::binary);
  std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  std::int32_t negative = -512;
  std::memcpy(bytes.data() + 20, &negative, sizeof negative);
  std::vector<float> wcls(512 * 64);
  for (std::size_t i = 0; i < wcls.size(); ++i) wcls[i] = static_cast<float>(i);
  std::string path = dir.file("unshared.bin");
  {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.write(reinterpret_cast<const char*>(wcls.data()), static_cast<std::streamsize>(wcls.size() * 4));
  }
  Model m = load_model(path, kTok512);
  CHECK(m.output.data != m.token_embedding.data);
  check_shape(m.output, 512, 64);
  CHECK(m.output.f32()[0] == 0.0f);
  CHECK(m.output.f32()[512 * 64 - 1] == static_cast<float>(512 * 64 - 1));
  CHECK_THAT(describe_model_file(path), Contains("vocab_size -512") && Contains("wcls"));
}

// A tiny llama GGUF (dim 32, hidden 64, 2 layers, 4 heads, 2 kv heads,
// vocab 8) with one thing changed, for the loader's validation.
struct TinyLlama {
  std::string architecture = "llama";
  std::string tokenizer = "llama";
  std::string skip_tensor;
  std::string reshape_tensor;  // gets one extra row
  DType norm_type = DType::f32;
  bool with_output = true;
  bool with_types = true;
  std::string last_piece = "<|im_end|>";

  void write(const std::string& path) const {
    gguf::Writer w;
    w.add("general.architecture", Value::string(architecture));
    w.add("general.name", Value::string("tiny"));
    const std::string a = architecture + ".";
    w.add(a + "context_length", Value::u32(16));
    w.add(a + "embedding_length", Value::u32(32));
    w.add(a + "feed_forward_length", Value::u32(64));
    w.add(a + "block_count", Value::u32(2));
    w.add(a + "attention.head_count", Value::u32(4));
    w.add(a + "attention.head_count_kv", Value::u32(2));
    w.add(a + "rope.freq_base", Value::f32(500000.0f));
    w.add(a + "attention.layer_norm_rms_epsilon", Value::f32(1e-6f));
    w.add("tokenizer.ggml.model", Value::string(tokenizer));
    w.add("tokenizer.ggml.tokens", Value::strings({"<unk>", "<s>", "</s>", "a", "b", "c", "d", last_piece}));
    w.add("tokenizer.ggml.scores", Value::floats({0, 0, 0, -1, -2, -3, -4, 0}));
    if (with_types) w.add("tokenizer.ggml.token_type", Value::int32s({2, 3, 3, 1, 1, 1, 1, 3}));
    w.add("tokenizer.ggml.merges", Value::strings({"a b"}));
    w.add("tokenizer.ggml.bos_token_id", Value::u32(1));
    w.add("tokenizer.ggml.eos_token_id", Value::u32(2));
    w.add("tokenizer.ggml.add_bos_token", Value::boolean(false));
    w.add("tokenizer.chat_template", Value::string("{{ messages }}"));
    auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols, DType type) {
      if (name == skip_tensor) return;
      w.add_tensor(name, {cols, name == reshape_tensor ? rows + 1 : rows}, type);
    };
    auto norm = [&](const std::string& name) {
      if (name == skip_tensor) return;
      w.add_tensor(name, {name == reshape_tensor ? 33 : 32}, norm_type);
    };
    matrix("token_embd.weight", 8, 32, DType::q8_0);
    norm("output_norm.weight");
    if (with_output) matrix("output.weight", 8, 32, DType::f16);
    for (int l = 0; l < 2; ++l) {
      std::string b = "blk." + std::to_string(l) + ".";
      norm(b + "attn_norm.weight");
      matrix(b + "attn_q.weight", 32, 32, DType::q4_0);
      matrix(b + "attn_k.weight", 16, 32, DType::q4_0);
      matrix(b + "attn_v.weight", 16, 32, DType::q8_0);
      matrix(b + "attn_output.weight", 32, 32, DType::bf16);
      norm(b + "ffn_norm.weight");
      matrix(b + "ffn_gate.weight", 64, 32, DType::f32);
      matrix(b + "ffn_down.weight", 32, 64, DType::f32);
      matrix(b + "ffn_up.weight", 64, 32, DType::f32);
    }
    w.write(path, [](std::size_t t, std::int64_t row, float* out) {
      out[0] = static_cast<float>(t) + 0.5f * static_cast<float>(row);
    });
  }
};

TEST_CASE("A GGUF llama with mixed tensor types loads, with its metadata", "[model]") {
  ScratchDir dir;
  std::string path = dir.file("tiny.gguf");
  TinyLlama{}.write(path);
  Model m = load_model(path);
  CHECK(m.name == "tiny");
  CHECK(m.params.rope_theta == 500000.0f);
  CHECK(m.params.rms_eps == 1e-6f);
  CHECK(m.params.n_kv_heads == 2);
  CHECK(m.params.vocab_size == 8);
  CHECK(m.token_embedding.type == DType::q8_0);
  CHECK(m.output.type == DType::f16);
  CHECK(m.layers[1].wq.type == DType::q4_0);
  CHECK(m.layers[1].wo.type == DType::bf16);
  CHECK(m.file_type == "mostly F32");
  check_shape(m.layers[1].wk, 16, 32);
  check_shape(m.layers[1].w_down, 32, 64);
  // Row r of ffn_down (tensor 10 in file order) starts with 10 + r/2.
  CHECK(m.layers[0].w_down.f32()[0] == 10.0f);
  CHECK(reinterpret_cast<const float*>(m.layers[0].w_down.row(3))[0] == 11.5f);
  CHECK(m.vocab.eot == 7);  // found by its text "<|im_end|>"
  CHECK_FALSE(m.vocab.add_bos);
  CHECK(m.vocab.chat_template == "{{ messages }}");
  CHECK(m.vocab.merges == std::vector<std::string>{"a b"});

  TinyLlama tied;
  tied.with_output = false;
  tied.with_types = false;
  tied.last_piece = "e";
  tied.write(path);
  Model t = load_model(path);
  CHECK(t.output.data == t.token_embedding.data);
  CHECK(t.output.type == DType::q8_0);
  CHECK_FALSE(t.vocab.eot);
  CHECK(t.vocab.types.empty());
  CHECK_THAT(describe_model_file(path), Contains("tied to token_embd"));
}

TEST_CASE("GGUF llama validation: architecture, tensors, shapes, norm types, tokenizer", "[model]") {
  ScratchDir dir;
  std::string path = dir.file("tiny.gguf");
  auto error_of = [&](const TinyLlama& tiny) {
    tiny.write(path);
    return load_error(path);
  };

  TinyLlama qwen;
  qwen.architecture = "qwen2";
  CHECK_THAT(error_of(qwen), Contains("unsupported architecture 'qwen2' (supported: llama)"));

  TinyLlama missing;
  missing.skip_tensor = "blk.1.ffn_up.weight";
  CHECK_THAT(error_of(missing), Contains("missing tensor 'blk.1.ffn_up.weight'"));

  TinyLlama missing_norm;
  missing_norm.skip_tensor = "output_norm.weight";
  CHECK_THAT(error_of(missing_norm), Contains("missing tensor 'output_norm.weight'"));

  TinyLlama wrong_k;
  wrong_k.reshape_tensor = "blk.0.attn_k.weight";
  CHECK_THAT(error_of(wrong_k), Contains("tensor 'blk.0.attn_k.weight'") && Contains("expected 16 x 32"));

  TinyLlama wrong_output;
  wrong_output.reshape_tensor = "output.weight";
  CHECK_THAT(error_of(wrong_output), Contains("tensor 'output.weight'") && Contains("expected 8 x 32"));

  TinyLlama wrong_norm;
  wrong_norm.reshape_tensor = "blk.1.ffn_norm.weight";
  CHECK_THAT(error_of(wrong_norm), Contains("tensor 'blk.1.ffn_norm.weight'") && Contains("expected 32"));

  TinyLlama f16_norm;
  f16_norm.norm_type = DType::f16;
  CHECK_THAT(error_of(f16_norm), Contains("is F16; norm weights must be F32"));

  TinyLlama bert_tokenizer;
  bert_tokenizer.tokenizer = "bert";
  CHECK_THAT(error_of(bert_tokenizer), Contains("unsupported tokenizer 'bert'"));

  TinyLlama gpt2;
  gpt2.tokenizer = "gpt2";
  gpt2.write(path);
  CHECK(load_model(path).vocab.kind == TokenizerKind::gpt2);
  CHECK_FALSE(load_model(path).vocab.add_space_prefix);

  // A metadata value of the wrong type names the key.
  gguf::Writer w;
  w.add("general.architecture", Value::string("llama"));
  w.add("llama.embedding_length", Value::string("64"));
  w.write(path, [](std::size_t, std::int64_t, float*) {});
  CHECK_THAT(load_error(path), Contains("'llama.embedding_length' is string, expected an integer"));

  gguf::Writer no_arch;
  no_arch.write(path, [](std::size_t, std::int64_t, float*) {});
  CHECK_THAT(load_error(path), Contains("missing metadata 'general.architecture'"));
  CHECK_THAT(describe_model_file(path), Contains("cannot load"));
}

TEST_CASE("write_random_llama_gguf writes a model that loads back and validates", "[model]") {
  ScratchDir dir;
  Hyperparams p;
  p.dim = 64;
  p.hidden_dim = 128;
  p.n_layers = 2;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.vocab_size = 1000;
  p.context_length = 256;
  DType type = GENERATE(DType::f32, DType::f16, DType::bf16, DType::q8_0, DType::q4_0);
  INFO(dtype_name(type));
  std::string path = dir.file("random.gguf");
  write_random_llama_gguf(path, p, type, 42, "tiny-bench");

  Model m = load_model(path);
  CHECK(m.params.dim == 64);
  CHECK(m.params.hidden_dim == 128);
  CHECK(m.params.n_layers == 2);
  CHECK(m.params.n_heads == 4);
  CHECK(m.params.n_kv_heads == 2);
  CHECK(m.params.vocab_size == 1000);
  CHECK(m.params.context_length == 256);
  CHECK_THAT(m.name, Contains("tiny-bench") && Contains("random"));
  CHECK(m.file_type == dtype_name(type));
  CHECK(m.token_embedding.type == type);
  CHECK(m.layers[1].w_down.type == type);
  CHECK(m.output.data != m.token_embedding.data);
  for (std::int64_t i = 0; i < 64; ++i) CHECK(m.layers[1].ffn_norm.f32()[i] == 1.0f);
  if (type == DType::f32) {
    // Uniform within sqrt(3 / cols), and not all alike.
    const float* w = m.layers[0].w_down.f32();
    float bound = std::sqrt(3.0f / 128.0f);
    double sum_sq = 0;
    for (std::int64_t i = 0; i < 64 * 128; ++i) {
      REQUIRE(std::fabs(w[i]) <= bound);
      sum_sq += w[i] * w[i];
    }
    CHECK(sum_sq / (64 * 128) == Approx(1.0 / 128).epsilon(0.1));
  }

  const Vocabulary& v = m.vocab;
  REQUIRE(v.pieces.size() == 1000);
  CHECK(v.kind == TokenizerKind::sentencepiece);
  CHECK(v.pieces[0] == "<unk>");
  CHECK(v.pieces[1] == "<s>");
  CHECK(v.pieces[2] == "</s>");
  CHECK(v.pieces[3] == "<0x00>");
  CHECK(v.pieces[3 + 0x41] == "<0x41>");
  CHECK(v.pieces[258] == "<0xFF>");
  CHECK(v.pieces[259] == "\xe2\x96\x81");
  CHECK(v.types[258] == TokenType::byte);
  CHECK(v.types[259] == TokenType::normal);
  CHECK(std::set<std::string>(v.pieces.begin(), v.pieces.end()).size() == 1000);
  for (std::size_t i = 260; i < 1000; ++i) REQUIRE(v.scores[i] < v.scores[i - 1]);
  CHECK(std::find(v.pieces.begin(), v.pieces.end(), "\xe2\x96\x81the") != v.pieces.end());

  // Deterministic in the seed.
  std::string again = dir.file("again.gguf");
  write_random_llama_gguf(again, p, type, 42, "tiny-bench");
  CHECK(same_floats(load_model(again).layers[0].attn_norm, m.layers[0].attn_norm));
  Model m2 = load_model(again);
  CHECK(std::memcmp(m2.layers[1].wq.data, m.layers[1].wq.data, m.layers[1].wq.bytes()) == 0);
  write_random_llama_gguf(again, p, type, 43, "tiny-bench");
  Model m3 = load_model(again);
  CHECK(std::memcmp(m3.layers[1].wq.data, m.layers[1].wq.data, m.layers[1].wq.bytes()) != 0);
}

TEST_CASE("Q8_0 matrices get an interleaved copy at load, the embedding keeps its rows", "[model]") {
  ScratchDir dir;
  Hyperparams p;
  p.dim = 64;
  p.hidden_dim = 96;
  p.n_layers = 2;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.vocab_size = 300;
  p.context_length = 64;
  std::string path = dir.file("q8.gguf");
  write_random_llama_gguf(path, p, DType::q8_0, 7, "interleaved");
  Model m = load_model(path);
  CHECK(m.token_embedding.interleaved == nullptr);
  std::vector<const Tensor*> matrices{&m.output};
  for (const auto& l : m.layers) {
    for (const Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_down, &l.w_up}) matrices.push_back(t);
  }
  for (const Tensor* t : matrices) {
    if (cpu::active_isa() == cpu::Isa::portable) {
      // The portable kernels read rows only: no copy to keep.
      CHECK(t->interleaved == nullptr);
      continue;
    }
    REQUIRE(t->interleaved != nullptr);
    // The rows (their pages dropped after interleaving) read back from the
    // file, and the copy is exactly their interleaving.
    std::vector<std::byte> expected(cpu::interleaved_bytes(*t));
    cpu::interleave_q8_0(*t, expected.data());
    CHECK(std::memcmp(expected.data(), t->interleaved, expected.size()) == 0);
  }
}

TEST_CASE("write_random_llama_gguf rejects configurations it cannot write", "[model]") {
  ScratchDir dir;
  Hyperparams p;
  p.dim = 48;
  p.hidden_dim = 128;
  p.n_layers = 1;
  p.n_heads = 4;
  p.n_kv_heads = 4;
  p.vocab_size = 300;
  p.context_length = 16;
  CHECK_NOTHROW(write_random_llama_gguf(dir.file("a.gguf"), p, DType::f16, 1, "x"));
  CHECK_THROWS_AS(write_random_llama_gguf(dir.file("b.gguf"), p, DType::q8_0, 1, "x"), std::invalid_argument);
  p.dim = 64;
  p.vocab_size = 100;
  CHECK_THROWS_AS(write_random_llama_gguf(dir.file("c.gguf"), p, DType::f32, 1, "x"), std::invalid_argument);
  p.vocab_size = 300;
  p.n_kv_heads = 3;
  CHECK_THROWS_AS(write_random_llama_gguf(dir.file("d.gguf"), p, DType::f32, 1, "x"), std::invalid_argument);
}

TEST_CASE("describe_model_file summarises GGUF files and llama2.c checkpoints", "[model]") {
  std::string g = describe_model_file(kStoriesGguf);
  CHECK_THAT(g, Contains("GGUF v3"));
  CHECK_THAT(g, Contains("architecture: llama"));
  CHECK_THAT(g, Contains("dim 64, hidden 172, layers 5, heads 8, kv heads 4, head dim 8, vocab 512, context 128"));
  CHECK_THAT(g, Contains("file type: F32"));
  CHECK_THAT(g, Contains("tokenizer: sentencepiece, 512 tokens"));
  CHECK_THAT(g, Contains("chat template: none"));
  CHECK_THAT(g, Contains("engine: supported"));
  CHECK_THAT(g, Contains("parameters: 292.8K (292800)"));
  CHECK_THAT(g, Contains("blk.4.attn_k.weight  32 x 64  F32"));
  CHECK_THAT(g, Contains("output_norm.weight  64  F32"));

  std::string b = describe_model_file(kStoriesBin);
  CHECK_THAT(b, Contains("llama2.c checkpoint"));
  CHECK_THAT(b, Contains("dim 64, hidden_dim 172, n_layers 5, n_heads 8, n_kv_heads 4, vocab_size 512, seq_len 512"));
  CHECK_THAT(b, Contains("tied to token_embedding_table"));
  CHECK_THAT(b, Contains("parameters: 260.0K (260032)"));
  CHECK_THAT(b, Contains("wk  5 x 32 x 64  F32"));
  CHECK_THAT(b, Contains("freq_cis_real  512 x 4  F32 (RoPE table, not used)"));
}

// Not run by default: the size of a small real model, to time the generator.
TEST_CASE("write_random_llama_gguf writes a 100M-parameter model", "[.][benchmark]") {
  ScratchDir dir;
  Hyperparams p;
  p.dim = 768;
  p.hidden_dim = 2048;
  p.n_layers = 12;
  p.n_heads = 12;
  p.n_kv_heads = 12;
  p.vocab_size = 32000;
  p.context_length = 1024;
  for (DType type : {DType::q8_0, DType::f32}) {
    auto start = std::chrono::steady_clock::now();
    write_random_llama_gguf(dir.file("big.gguf"), p, type, 7, "bench-110M");
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CHECK_NOTHROW(load_model(dir.file("big.gguf")));
    CHECK_THAT(describe_model_file(dir.file("big.gguf")), Contains("parameters: 134.1M (134105856)"));
    WARN(dtype_name(type) << ": " << seconds << " s, " << fs::file_size(dir.file("big.gguf")) / 1e6 << " MB");
  }
}

}  // namespace
}  // namespace tollgate::local_engine
