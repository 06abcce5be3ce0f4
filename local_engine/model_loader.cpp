// load_model and describe_model_file: GGUF llama files and llama2.c checkpoints.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <sstream>

#include "local_engine/cpu_ops.hpp"
#include "local_engine/gguf.hpp"
#include "local_engine/model.hpp"
#include "local_engine/thread_pool.hpp"
#include "local_engine/tokenizer.hpp"

namespace tollgate::local_engine {
namespace {

// Bounds far above any real Llama; they keep every size product in range.
constexpr std::int64_t kMaxDim = std::int64_t{1} << 16;
constexpr std::int64_t kMaxHidden = std::int64_t{1} << 18;
constexpr std::int64_t kMaxLayers = 1024;
constexpr std::int64_t kMaxVocab = std::int64_t{1} << 22;
constexpr std::int64_t kMaxContext = std::int64_t{1} << 24;

constexpr std::uint32_t kNullToken = 0xffffffffu;  // GGUF's "no such token"

std::string in_quotes(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string file_stem(const std::string& path) { return std::filesystem::path(path).stem().string(); }

bool is_gguf(const MappedFile& file) { return file.size() >= 4 && std::memcmp(file.data(), "GGUF", 4) == 0; }

void check_range(const std::string& where, std::string_view what, std::int64_t v, std::int64_t max) {
  if (v < 1 || v > max) {
    throw ModelError(where + ": " + std::string(what) + " = " + std::to_string(v) + " is out of range (1.." +
                     std::to_string(max) + ")");
  }
}

void check_hyperparams(const std::string& where, const Hyperparams& p) {
  check_range(where, "dim", p.dim, kMaxDim);
  check_range(where, "hidden_dim", p.hidden_dim, kMaxHidden);
  check_range(where, "n_layers", p.n_layers, kMaxLayers);
  check_range(where, "n_heads", p.n_heads, p.dim);
  check_range(where, "n_kv_heads", p.n_kv_heads, p.n_heads);
  check_range(where, "vocab_size", p.vocab_size, kMaxVocab);
  check_range(where, "context_length", p.context_length, kMaxContext);
  if (p.dim % p.n_heads != 0) {
    throw ModelError(where + ": dim " + std::to_string(p.dim) + " is not a multiple of n_heads " +
                     std::to_string(p.n_heads));
  }
  if (p.n_heads % p.n_kv_heads != 0) {
    throw ModelError(where + ": n_heads " + std::to_string(p.n_heads) + " is not a multiple of n_kv_heads " +
                     std::to_string(p.n_kv_heads));
  }
  if (p.head_dim() % 2 != 0) throw ModelError(where + ": head dimension " + std::to_string(p.head_dim()) + " is odd");
  if (!(p.rope_theta > 0.0f) || !(p.rms_eps > 0.0f)) throw ModelError(where + ": rope theta and rms eps must be > 0");
}

std::string format_count(std::int64_t n) {
  char buf[32];
  if (n >= 1'000'000'000) {
    std::snprintf(buf, sizeof buf, "%.2fB", static_cast<double>(n) / 1e9);
  } else if (n >= 1'000'000) {
    std::snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(n) / 1e6);
  } else if (n >= 1'000) {
    std::snprintf(buf, sizeof buf, "%.1fK", static_cast<double>(n) / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  }
  return buf;
}

// "F32" when every matrix has one type, else "mostly X" after the type
// holding the most elements.
std::string file_type_of(const std::vector<std::pair<std::string_view, std::int64_t>>& matrices) {
  std::map<std::string_view, std::int64_t> elements;
  for (const auto& [type, n] : matrices) elements[type] += n;
  if (elements.empty()) return "none";
  auto most = elements.begin();
  for (auto it = elements.begin(); it != elements.end(); ++it) {
    if (it->second > most->second) most = it;
  }
  std::string name(most->first);
  return elements.size() == 1 ? name : "mostly " + name;
}

std::string hyperparams_line(const Hyperparams& p) {
  std::ostringstream out;
  out << "dim " << p.dim << ", hidden " << p.hidden_dim << ", layers " << p.n_layers << ", heads " << p.n_heads
      << ", kv heads " << p.n_kv_heads << ", head dim " << (p.n_heads > 0 ? p.dim / p.n_heads : 0) << ", vocab "
      << p.vocab_size << ", context " << p.context_length << ", rope theta " << p.rope_theta << ", rms eps "
      << p.rms_eps;
  return out.str();
}

std::string_view tokenizer_kind_name(TokenizerKind kind) {
  return kind == TokenizerKind::sentencepiece ? "sentencepiece" : "gpt2";
}

// A llama2.c tokenizer, as a ModelError if it is unusable for this model.
Vocabulary load_tokenizer_for(const std::string& model_path, const std::string& tokenizer_path,
                              std::int64_t vocab_size) {
  Vocabulary vocab;
  try {
    vocab = load_llama2c_tokenizer(tokenizer_path);
  } catch (const ModelError&) {
    throw;
  } catch (const std::exception& e) {
    throw ModelError(tokenizer_path + ": " + e.what());
  }
  if (static_cast<std::int64_t>(vocab.pieces.size()) != vocab_size) {
    throw ModelError(tokenizer_path + ": tokenizer has " + std::to_string(vocab.pieces.size()) + " tokens, but " +
                     model_path + " has a vocabulary of " + std::to_string(vocab_size));
  }
  return vocab;
}

// ---- GGUF ----

std::int64_t required_integer(const gguf::File& file, const std::string& key) {
  auto v = file.get_integer(key);
  if (!v) throw ModelError(file.path() + ": missing metadata " + in_quotes(key));
  return *v;
}

// The llama hyperparameters; vocab_size from the token list or llama.vocab_size.
Hyperparams read_llama_hyperparams(const gguf::File& file) {
  auto arch = file.get_string("general.architecture");
  if (!arch) throw ModelError(file.path() + ": missing metadata 'general.architecture'");
  if (*arch != "llama")
    throw ModelError(file.path() + ": unsupported architecture " + in_quotes(*arch) + " (supported: llama)");
  Hyperparams p;
  p.architecture = *arch;
  p.dim = required_integer(file, "llama.embedding_length");
  p.hidden_dim = required_integer(file, "llama.feed_forward_length");
  p.n_layers = required_integer(file, "llama.block_count");
  p.n_heads = required_integer(file, "llama.attention.head_count");
  p.n_kv_heads = file.get_integer("llama.attention.head_count_kv").value_or(p.n_heads);
  p.context_length = required_integer(file, "llama.context_length");
  p.rope_theta = static_cast<float>(file.get_real("llama.rope.freq_base").value_or(10000.0));
  p.rms_eps = static_cast<float>(file.get_real("llama.attention.layer_norm_rms_epsilon").value_or(1e-5));
  if (const gguf::Value* tokens = file.find("tokenizer.ggml.tokens"); tokens && tokens->as_array()) {
    p.vocab_size = static_cast<std::int64_t>(tokens->as_array()->size());
  } else {
    p.vocab_size = file.get_integer("llama.vocab_size").value_or(0);
  }
  if (p.vocab_size == 0) throw ModelError(file.path() + ": no tokenizer.ggml.tokens and no llama.vocab_size");
  check_hyperparams(file.path(), p);
  if (auto rope_dims = file.get_integer("llama.rope.dimension_count"); rope_dims && *rope_dims != p.head_dim()) {
    throw ModelError(file.path() + ": llama.rope.dimension_count " + std::to_string(*rope_dims) +
                     " differs from the head dimension " + std::to_string(p.head_dim()) +
                     " (partial RoPE is not supported)");
  }
  return p;
}

// Anonymous memory for weights the loader makes (converted and interleaved
// Q8_0 matrices): page-aligned, and untouched pages cost nothing until written.
class AnonymousMemory {
 public:
  explicit AnonymousMemory(std::size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw ModelError("cannot allocate " + std::to_string(size) + " bytes for weights");
    data_ = static_cast<std::byte*>(p);
  }
  ~AnonymousMemory() { ::munmap(data_, size_); }
  AnonymousMemory(const AnonymousMemory&) = delete;
  AnonymousMemory& operator=(const AnonymousMemory&) = delete;
  std::byte* data() const { return data_; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A matrix of a block type the engine does not compute in, as Q8_0: each row
// decoded and requantised, rows split over the pool (a 1B model is ~1e9 values).
Tensor convert_to_q8_0(const gguf::TensorInfo& t, ThreadPool& pool,
                       std::vector<std::shared_ptr<const AnonymousMemory>>& keep) {
  const std::int64_t rows = t.rows();
  const std::int64_t cols = t.cols();
  const gguf::BlockLayout& l = gguf::layout(*t.blocks);
  const std::size_t in_row = static_cast<std::size_t>(cols / l.values) * l.bytes;
  const std::size_t out_row = row_bytes(DType::q8_0, cols);
  auto memory = std::make_shared<AnonymousMemory>(static_cast<std::size_t>(rows) * out_row);
  pool.parallel_for(rows, [&](std::int64_t begin, std::int64_t end) {
    std::vector<float> values(static_cast<std::size_t>(cols));
    for (std::int64_t r = begin; r < end; ++r) {
      gguf::dequantize_blocks(*t.blocks, t.data + static_cast<std::size_t>(r) * in_row, cols, values.data());
      cpu::quantize_row_q8_0(
          values.data(), reinterpret_cast<BlockQ8_0*>(memory->data() + static_cast<std::size_t>(r) * out_row), cols);
    }
  });
  Tensor out{DType::q8_0, memory->data(), rows, cols};
  keep.push_back(std::move(memory));
  return out;
}

class GgufTensors {
 public:
  explicit GgufTensors(const gguf::File& file) : file_(file) {}

  // A rows x cols matrix (ne = [cols, rows]) of any supported type.
  Tensor matrix(const std::string& name, std::int64_t rows, std::int64_t cols, std::string_view shape) {
    const gguf::TensorInfo& t = get(name);
    bool ok = t.ne[0] == cols && t.ne.size() >= 2 && t.ne[1] == rows;
    for (std::size_t d = 2; d < t.ne.size(); ++d) ok = ok && t.ne[d] == 1;
    if (!ok) wrong_shape(t, std::to_string(rows) + " x " + std::to_string(cols) + " (" + std::string(shape) + ")");
    matrices_.emplace_back(t.type_name(), t.elements());
    if (!t.blocks) return t.tensor();
    if (!pool_) pool_ = std::make_unique<ThreadPool>();  // only for files that need converting
    return convert_to_q8_0(t, *pool_, converted_);
  }

  // A norm weight: n F32 values.
  Tensor norm(const std::string& name, std::int64_t n) {
    const gguf::TensorInfo& t = get(name);
    bool ok = t.ne[0] == n;
    for (std::size_t d = 1; d < t.ne.size(); ++d) ok = ok && t.ne[d] == 1;
    if (!ok) wrong_shape(t, std::to_string(n) + " (dim)");
    if (t.type != DType::f32) {
      throw ModelError(file_.path() + ": tensor " + in_quotes(name) + " is " + std::string(t.type_name()) +
                       "; norm weights must be F32");
    }
    return t.tensor();
  }

  bool has(const std::string& name) const { return file_.find_tensor(name) != nullptr; }
  const std::vector<std::pair<std::string_view, std::int64_t>>& matrices() const { return matrices_; }
  // The converted matrices' memory, for the Model to keep.
  std::shared_ptr<const void> converted() const {
    return converted_.empty() ? nullptr
                              : std::make_shared<std::vector<std::shared_ptr<const AnonymousMemory>>>(converted_);
  }

 private:
  const gguf::TensorInfo& get(const std::string& name) const {
    const gguf::TensorInfo* t = file_.find_tensor(name);
    if (t == nullptr) throw ModelError(file_.path() + ": missing tensor " + in_quotes(name));
    return *t;
  }

  [[noreturn]] void wrong_shape(const gguf::TensorInfo& t, const std::string& expected) const {
    std::string ne;
    for (auto n : t.ne) ne += (ne.empty() ? "" : ", ") + std::to_string(n);
    throw ModelError(file_.path() + ": tensor " + in_quotes(t.name) + " has ne [" + ne + "], i.e. " +
                     std::to_string(t.rows()) + " x " + std::to_string(t.cols()) + " (rows x cols); expected " +
                     expected);
  }

  const gguf::File& file_;
  std::vector<std::pair<std::string_view, std::int64_t>> matrices_;
  std::vector<std::shared_ptr<const AnonymousMemory>> converted_;
  std::unique_ptr<ThreadPool> pool_;
};

std::optional<std::int32_t> token_id(const gguf::File& file, const std::string& key, std::int64_t vocab_size) {
  auto id = file.get_integer(key);
  if (!id || *id == kNullToken || *id == -1) return std::nullopt;
  if (*id < 0 || *id >= vocab_size) {
    throw ModelError(file.path() + ": " + key + " " + std::to_string(*id) + " is outside the vocabulary of " +
                     std::to_string(vocab_size));
  }
  return static_cast<std::int32_t>(*id);
}

Vocabulary read_gguf_vocabulary(const gguf::File& file, std::int64_t vocab_size) {
  Vocabulary v;
  auto model = file.get_string("tokenizer.ggml.model");
  if (!model) throw ModelError(file.path() + ": missing metadata 'tokenizer.ggml.model'");
  if (*model == "llama") {
    v.kind = TokenizerKind::sentencepiece;
  } else if (*model == "gpt2") {
    v.kind = TokenizerKind::gpt2;
  } else {
    throw ModelError(file.path() + ": unsupported tokenizer " + in_quotes(*model) + " (supported: llama, gpt2)");
  }
  auto tokens = file.get_strings("tokenizer.ggml.tokens");
  if (!tokens) throw ModelError(file.path() + ": missing metadata 'tokenizer.ggml.tokens'");
  v.pieces = std::move(*tokens);
  if (static_cast<std::int64_t>(v.pieces.size()) != vocab_size) {
    throw ModelError(file.path() + ": tokenizer.ggml.tokens has " + std::to_string(v.pieces.size()) +
                     " entries, the model's vocabulary is " + std::to_string(vocab_size));
  }
  auto same_length = [&](std::string_view key, std::size_t n) {
    if (n != v.pieces.size()) {
      throw ModelError(file.path() + ": " + std::string(key) + " has " + std::to_string(n) + " entries for " +
                       std::to_string(v.pieces.size()) + " tokens");
    }
  };
  if (auto scores = file.get_floats("tokenizer.ggml.scores")) {
    same_length("tokenizer.ggml.scores", scores->size());
    v.scores = std::move(*scores);
  }
  if (auto types = file.get_integers("tokenizer.ggml.token_type")) {
    same_length("tokenizer.ggml.token_type", types->size());
    v.types.reserve(types->size());
    for (std::size_t i = 0; i < types->size(); ++i) {
      auto t = (*types)[i];
      if (t == 0) t = static_cast<std::int64_t>(TokenType::normal);  // "undefined" in older files
      if (t < 1 || t > 6) {
        throw ModelError(file.path() + ": tokenizer.ggml.token_type of token " + std::to_string(i) + " is " +
                         std::to_string(t));
      }
      v.types.push_back(static_cast<TokenType>(t));
    }
  }
  if (auto merges = file.get_strings("tokenizer.ggml.merges")) v.merges = std::move(*merges);
  if (v.kind == TokenizerKind::gpt2 && v.merges.empty()) {
    throw ModelError(file.path() + ": a gpt2 tokenizer needs tokenizer.ggml.merges");
  }

  v.add_bos = file.get_bool("tokenizer.ggml.add_bos_token").value_or(v.kind == TokenizerKind::sentencepiece);
  v.add_space_prefix =
      file.get_bool("tokenizer.ggml.add_space_prefix").value_or(v.kind == TokenizerKind::sentencepiece);
  if (auto bos = token_id(file, "tokenizer.ggml.bos_token_id", vocab_size)) {
    v.bos = *bos;
  } else if (file.find("tokenizer.ggml.bos_token_id") != nullptr) {
    v.add_bos = false;  // explicitly none
  }
  if (auto eos = token_id(file, "tokenizer.ggml.eos_token_id", vocab_size)) v.eos = *eos;
  if (auto unk = token_id(file, "tokenizer.ggml.unknown_token_id", vocab_size)) v.unk = *unk;
  v.eot = token_id(file, "tokenizer.ggml.eot_token_id", vocab_size);
  if (!v.eot) {
    for (std::string_view marker : {"<|eot_id|>", "<|im_end|>", "<end_of_turn>"}) {
      for (std::size_t i = 0; i < v.pieces.size() && !v.eot; ++i) {
        if (v.pieces[i] == marker) v.eot = static_cast<std::int32_t>(i);
      }
      if (v.eot) break;
    }
  }
  v.pre = file.get_string("tokenizer.ggml.pre").value_or("");
  v.chat_template = file.get_string("tokenizer.chat_template").value_or("");
  return v;
}

// Gives every Q8_0 matrix the CPU matmul runs (all but the embedding, unless
// the output shares it) an interleaved copy, so no call rearranges rows. The
// kernels then never read the mapped rows, so their pages are dropped from
// the process (clean file pages: read again from the file if anything does):
// the model's resident size stays that of one copy. (Matrices converted at
// load are anonymous memory: theirs are freed, and nothing reads them again.)
// Skipped where the kernels would not read the copy (no AVX2).
void interleave_q8_0_matrices(Model& m) {
  if (cpu::active_isa() == cpu::Isa::portable) return;
  std::vector<Tensor*> matrices;
  auto consider = [&](Tensor& t) {
    if (t.type == DType::q8_0) matrices.push_back(&t);
  };
  consider(m.output);
  for (auto& l : m.layers) {
    for (Tensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_down, &l.w_up}) consider(*t);
  }
  if (matrices.empty()) return;
  constexpr std::size_t kAlign = 64;
  std::size_t total = 0;
  for (const Tensor* t : matrices) total += (cpu::interleaved_bytes(*t) + kAlign - 1) / kAlign * kAlign;
  auto memory = std::make_shared<AnonymousMemory>(total);
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  std::byte* out = memory->data();
  for (Tensor* t : matrices) {
    cpu::interleave_q8_0(*t, out);
    t->interleaved = out;
    out += (cpu::interleaved_bytes(*t) + kAlign - 1) / kAlign * kAlign;
    if (t->data == m.token_embedding.data) continue;  // the embedding still reads these rows
    const auto begin = (reinterpret_cast<std::uintptr_t>(t->data) + page - 1) / page * page;
    const auto end = (reinterpret_cast<std::uintptr_t>(t->data) + t->bytes()) / page * page;
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }
  m.interleaved_storage = std::move(memory);
}

Model load_gguf(std::shared_ptr<const MappedFile> mapping, const std::string& tokenizer_path) {
  const std::string path = mapping->path();
  gguf::File file(std::move(mapping));
  Model m;
  m.params = read_llama_hyperparams(file);
  const Hyperparams& p = m.params;
  m.name = file.get_string("general.name").value_or(file_stem(path));

  GgufTensors tensors(file);
  std::int64_t kv_dim = p.n_kv_heads * p.head_dim();
  m.token_embedding = tensors.matrix("token_embd.weight", p.vocab_size, p.dim, "vocab x dim");
  m.output_norm = tensors.norm("output_norm.weight", p.dim);
  m.output = tensors.has("output.weight") ? tensors.matrix("output.weight", p.vocab_size, p.dim, "vocab x dim")
                                          : m.token_embedding;
  m.layers.reserve(static_cast<std::size_t>(p.n_layers));
  for (std::int64_t l = 0; l < p.n_layers; ++l) {
    std::string blk = "blk." + std::to_string(l) + ".";
    LayerWeights w;
    w.attn_norm = tensors.norm(blk + "attn_norm.weight", p.dim);
    w.wq = tensors.matrix(blk + "attn_q.weight", p.dim, p.dim, "dim x dim");
    w.wk = tensors.matrix(blk + "attn_k.weight", kv_dim, p.dim, "kv_dim x dim");
    w.wv = tensors.matrix(blk + "attn_v.weight", kv_dim, p.dim, "kv_dim x dim");
    w.wo = tensors.matrix(blk + "attn_output.weight", p.dim, p.dim, "dim x dim");
    w.ffn_norm = tensors.norm(blk + "ffn_norm.weight", p.dim);
    w.w_gate = tensors.matrix(blk + "ffn_gate.weight", p.hidden_dim, p.dim, "hidden x dim");
    w.w_down = tensors.matrix(blk + "ffn_down.weight", p.dim, p.hidden_dim, "dim x hidden");
    w.w_up = tensors.matrix(blk + "ffn_up.weight", p.hidden_dim, p.dim, "hidden x dim");
    m.layers.push_back(w);
  }
  m.file_type = file_type_of(tensors.matrices());
  m.vocab = tokenizer_path.empty() ? read_gguf_vocabulary(file, p.vocab_size)
                                   : load_tokenizer_for(path, tokenizer_path, p.vocab_size);
  m.storage = file.mapping();
  m.converted_storage = tensors.converted();
  interleave_q8_0_matrices(m);
  return m;
}

// ---- llama2.c ----

// One weight array of a llama2.c checkpoint: `count` matrices (one per layer,
// or 1) of rows x cols floats at `offset` floats after the header.
struct Llama2cTensor {
  std::string name;
  std::int64_t count;
  std::int64_t rows;
  std::int64_t cols;
  std::uint64_t offset = 0;
  bool weights = true;  // false for the RoPE tables the engine recomputes
};

struct Llama2cLayout {
  Hyperparams params;
  bool shared_classifier = true;
  std::vector<Llama2cTensor> tensors;
  std::uint64_t expected_bytes = 0;

  const Llama2cTensor& get(std::string_view name) const {
    for (const auto& t : tensors) {
      if (t.name == name) return t;
    }
    throw std::logic_error("no llama2.c tensor " + std::string(name));
  }
};

constexpr std::size_t kLlama2cHeaderBytes = 7 * sizeof(std::int32_t);

Llama2cLayout read_llama2c_layout(const MappedFile& file) {
  const std::string& path = file.path();
  if (file.size() < kLlama2cHeaderBytes) {
    throw ModelError(path + ": neither GGUF nor a llama2.c checkpoint (" + std::to_string(file.size()) +
                     " bytes, shorter than the 28-byte header)");
  }
  std::int32_t h[7];
  std::memcpy(h, file.data(), sizeof h);
  Llama2cLayout layout;
  Hyperparams& p = layout.params;
  p.dim = h[0];
  p.hidden_dim = h[1];
  p.n_layers = h[2];
  p.n_heads = h[3];
  p.n_kv_heads = h[4];
  layout.shared_classifier = h[5] > 0;
  p.vocab_size = h[5] == std::numeric_limits<std::int32_t>::min() ? 0 : (h[5] < 0 ? -h[5] : h[5]);
  p.context_length = h[6];
  check_hyperparams(path + " (no GGUF magic, so read as a llama2.c checkpoint)", p);

  std::int64_t kv_dim = p.n_kv_heads * p.head_dim();
  std::int64_t L = p.n_layers;
  layout.tensors = {
      {"token_embedding_table", 1, p.vocab_size, p.dim},
      {"rms_att_weight", L, 1, p.dim},
      {"wq", L, p.dim, p.dim},
      {"wk", L, kv_dim, p.dim},
      {"wv", L, kv_dim, p.dim},
      {"wo", L, p.dim, p.dim},
      {"rms_ffn_weight", L, 1, p.dim},
      {"w1", L, p.hidden_dim, p.dim},
      {"w2", L, p.dim, p.hidden_dim},
      {"w3", L, p.hidden_dim, p.dim},
      {"rms_final_weight", 1, 1, p.dim},
      {"freq_cis_real", 1, p.context_length, p.head_dim() / 2, 0, false},
      {"freq_cis_imag", 1, p.context_length, p.head_dim() / 2, 0, false},
  };
  if (!layout.shared_classifier) layout.tensors.push_back({"wcls", 1, p.vocab_size, p.dim});
  std::uint64_t floats = 0;
  for (auto& t : layout.tensors) {
    t.offset = floats;
    floats += static_cast<std::uint64_t>(t.count * t.rows * t.cols);
  }
  layout.expected_bytes = kLlama2cHeaderBytes + floats * sizeof(float);
  if (file.size() != layout.expected_bytes) {
    throw ModelError(path + ": llama2.c checkpoint is " + std::to_string(file.size()) + " bytes, but its header (" +
                     hyperparams_line(p) + (layout.shared_classifier ? ", shared" : ", separate") +
                     " classifier) needs exactly " + std::to_string(layout.expected_bytes) +
                     (file.size() < layout.expected_bytes ? " (truncated)" : " (trailing data)"));
  }
  return layout;
}

Model load_llama2c(std::shared_ptr<const MappedFile> file, const std::string& tokenizer_path) {
  Llama2cLayout layout = read_llama2c_layout(*file);
  if (tokenizer_path.empty()) {
    throw ModelError(file->path() + ": a llama2.c checkpoint needs a tokenizer file (tok512.bin, tokenizer.bin)");
  }
  Model m;
  m.params = layout.params;
  const Hyperparams& p = m.params;
  m.name = file_stem(file->path());
  m.file_type = "F32";
  const auto* weights = reinterpret_cast<const float*>(file->data() + kLlama2cHeaderBytes);
  auto at = [&](std::string_view name, std::int64_t layer) {
    const Llama2cTensor& t = layout.get(name);
    const float* data = weights + t.offset + static_cast<std::uint64_t>(layer * t.rows * t.cols);
    return Tensor{DType::f32, data, t.rows, t.cols};
  };
  m.token_embedding = at("token_embedding_table", 0);
  m.output_norm = at("rms_final_weight", 0);
  m.output = layout.shared_classifier ? m.token_embedding : at("wcls", 0);
  for (std::int64_t l = 0; l < p.n_layers; ++l) {
    LayerWeights w;
    w.attn_norm = at("rms_att_weight", l);
    w.wq = at("wq", l);
    w.wk = at("wk", l);
    w.wv = at("wv", l);
    w.wo = at("wo", l);
    w.ffn_norm = at("rms_ffn_weight", l);
    w.w_gate = at("w1", l);
    w.w_down = at("w2", l);
    w.w_up = at("w3", l);
    m.layers.push_back(w);
  }
  m.vocab = load_tokenizer_for(file->path(), tokenizer_path, p.vocab_size);
  m.storage = std::move(file);
  return m;
}

// ---- describe ----

std::string describe_gguf(std::shared_ptr<const MappedFile> mapping) {
  const std::string path = mapping->path();
  gguf::File file(std::move(mapping));
  std::ostringstream out;
  out << "file: " << path << "\n";
  out << "format: GGUF v" << file.version() << ", " << file.metadata().size() << " metadata keys, "
      << file.tensors().size() << " tensors, alignment " << file.alignment() << "\n";
  out << "name: " << file.get_string("general.name").value_or(file_stem(path)) << "\n";
  std::string arch = file.get_string("general.architecture").value_or("(none)");
  out << "architecture: " << arch << "\n";

  std::string status = "supported";
  try {
    Model m = load_model(path);
    out << "hyperparameters: " << hyperparams_line(m.params) << "\n";
    out << "file type: " << m.file_type << "\n";
    out << "output: " << (m.output.data == m.token_embedding.data ? "tied to token_embd" : "separate") << "\n";
    out << "tokenizer: " << tokenizer_kind_name(m.vocab.kind) << ", " << m.vocab.pieces.size() << " tokens"
        << (m.vocab.pre.empty() ? "" : ", pre " + m.vocab.pre) << "\n";
    out << "chat template: "
        << (m.vocab.chat_template.empty() ? "none" : std::to_string(m.vocab.chat_template.size()) + " characters")
        << "\n";
  } catch (const ModelError& e) {
    status = std::string("cannot load: ") + e.what();
  }
  out << "engine: " << status << "\n";

  std::int64_t parameters = 0;
  for (const auto& t : file.tensors()) parameters += t.elements();
  out << "parameters: " << format_count(parameters) << " (" << parameters << ")\n";
  out << "tensors (rows x cols, type):\n";
  for (const auto& t : file.tensors()) {
    out << "  " << t.name << "  ";
    if (t.ne.size() == 1) {
      out << t.cols();
    } else {
      for (std::size_t d = t.ne.size(); d-- > 1;) out << t.ne[d] << " x ";
      out << t.cols();
    }
    out << "  " << t.type_name() << "\n";
  }
  return out.str();
}

std::string describe_llama2c(const MappedFile& file) {
  Llama2cLayout layout = read_llama2c_layout(file);
  const Hyperparams& p = layout.params;
  std::ostringstream out;
  out << "file: " << file.path() << "\n";
  out << "format: llama2.c checkpoint (header: dim " << p.dim << ", hidden_dim " << p.hidden_dim << ", n_layers "
      << p.n_layers << ", n_heads " << p.n_heads << ", n_kv_heads " << p.n_kv_heads << ", vocab_size "
      << (layout.shared_classifier ? "" : "-") << p.vocab_size << ", seq_len " << p.context_length << ")\n";
  out << "architecture: llama\n";
  out << "hyperparameters: " << hyperparams_line(p) << "\n";
  out << "file type: F32\n";
  out << "output: " << (layout.shared_classifier ? "tied to token_embedding_table" : "separate (wcls)") << "\n";
  out << "tokenizer: separate llama2.c tokenizer file, " << p.vocab_size << " tokens expected\n";
  out << "chat template: none\n";
  std::int64_t parameters = 0;
  for (const auto& t : layout.tensors) {
    if (t.weights) parameters += t.count * t.rows * t.cols;
  }
  out << "parameters: " << format_count(parameters) << " (" << parameters << ")\n";
  out << "tensors (layers x rows x cols, type):\n";
  for (const auto& t : layout.tensors) {
    out << "  " << t.name << "  ";
    if (t.count > 1) out << t.count << " x ";
    if (t.rows > 1) out << t.rows << " x ";
    out << t.cols << "  F32" << (t.weights ? "" : " (RoPE table, not used)") << "\n";
  }
  return out.str();
}

}  // namespace

Model load_model(const std::string& path, const std::string& tokenizer_path) {
  auto file = std::make_shared<const MappedFile>(path);
  if (is_gguf(*file)) return load_gguf(std::move(file), tokenizer_path);
  return load_llama2c(std::move(file), tokenizer_path);
}

Vocabulary load_vocabulary(const std::string& path) {
  auto file = std::make_shared<const MappedFile>(path);
  if (!is_gguf(*file)) {
    try {
      return load_llama2c_tokenizer(path);
    } catch (const ModelError&) {
      throw;
    } catch (const std::exception& e) {
      throw ModelError(path + ": " + e.what());
    }
  }
  gguf::File gguf(std::move(file));
  auto tokens = gguf.get_strings("tokenizer.ggml.tokens");
  if (!tokens) throw ModelError(path + ": missing metadata 'tokenizer.ggml.tokens'");
  return read_gguf_vocabulary(gguf, static_cast<std::int64_t>(tokens->size()));
}

std::string describe_model_file(const std::string& path) {
  auto file = std::make_shared<const MappedFile>(path);
  if (is_gguf(*file)) return describe_gguf(std::move(file));
  return describe_llama2c(*file);
}

}  // namespace tollgate::local_engine
