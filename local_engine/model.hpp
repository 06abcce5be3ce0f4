// A Llama-family decoder model: hyperparameters, weights and vocabulary, loaded
// from a GGUF file or a llama2.c checkpoint (+ tokenizer file).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "local_engine/tensor.hpp"
#include "local_engine/vocabulary.hpp"

namespace tollgate::local_engine {

// A file the engine cannot serve: unsupported architecture or type, truncated,
// inconsistent. The message says which and where.
struct ModelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Hyperparams {
  std::string architecture = "llama";
  std::int64_t dim = 0;         // embedding length
  std::int64_t hidden_dim = 0;  // feed-forward length
  std::int64_t n_layers = 0;
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;  // grouped-query attention when < n_heads
  std::int64_t vocab_size = 0;
  std::int64_t context_length = 0;  // what the file claims; the engine warns past it
  float rope_theta = 10000.0f;
  float rms_eps = 1e-5f;
  std::int64_t head_dim() const { return dim / n_heads; }
};

struct LayerWeights {
  Tensor attn_norm;  // 1 x dim, f32
  Tensor wq;         // dim x dim
  Tensor wk;         // (n_kv_heads*head_dim) x dim
  Tensor wv;         // (n_kv_heads*head_dim) x dim
  Tensor wo;         // dim x dim
  Tensor ffn_norm;   // 1 x dim, f32
  Tensor w_gate;     // hidden x dim (llama2.c w1)
  Tensor w_down;     // dim x hidden (w2)
  Tensor w_up;       // hidden x dim (w3)
};

// Q and K rows are laid out so RoPE rotates adjacent pairs (x[2i], x[2i+1])
// of each head, the layout of both GGUF llama files and llama2.c checkpoints.
struct Model {
  Hyperparams params;
  std::string name;        // general.name, or the file's stem
  std::string file_type;   // e.g. "F32", "Q8_0", "mostly F16", "mostly Q4_K" (as the file stores them)
  Tensor token_embedding;  // vocab x dim
  Tensor output_norm;      // 1 x dim, f32
  Tensor output;           // vocab x dim; the embedding itself when tied
  std::vector<LayerWeights> layers;
  Vocabulary vocab;
  std::shared_ptr<const void> storage;  // keeps the mapping (or owned buffers) alive
  // Holds the Q8_0 matrices converted at load from block types the engine
  // does not compute in (Q4_K, Q6_K, ...).
  std::shared_ptr<const void> converted_storage;
  // Holds the matrices' Tensor::interleaved copies (Q8_0 files on CPUs with AVX2).
  std::shared_ptr<const void> interleaved_storage;
};

// By content, not by name: GGUF files start with "GGUF"; anything else is read
// as a llama2.c checkpoint, which needs `tokenizer_path` (a llama2.c tokenizer
// file). For GGUF, a non-empty tokenizer_path overrides the file's vocabulary
// with a llama2.c tokenizer. Throws ModelError.
Model load_model(const std::string& path, const std::string& tokenizer_path = {});

// Only the vocabulary: of a GGUF file (any architecture), or of a llama2.c
// tokenizer file. For counting tokens where no model runs. Throws ModelError.
Vocabulary load_vocabulary(const std::string& path);

// A human-readable summary for `tollgate model info`: architecture, sizes,
// tensor names, shapes and types.
std::string describe_model_file(const std::string& path);

// Writes a llama GGUF with random weights (uniform, scaled by 1/sqrt(cols) so
// activations stay finite; norms 1) and a built-in byte-fallback SentencePiece
// vocabulary of params.vocab_size pieces (at least 259): for demos and
// benchmarks only, and named so. Matrices and the embedding are stored as
// `weight_type`, norms as F32; rows are streamed to the file. Deterministic in
// `seed`. Throws std::invalid_argument for inconsistent hyperparameters (or
// dim/hidden_dim not multiples of 32 for quantised types), std::runtime_error
// when the file cannot be written.
void write_random_llama_gguf(const std::string& path, const Hyperparams& params, DType weight_type, std::uint64_t seed,
                             const std::string& name);

// Writes the random-weight demo model (a small llama GGUF, labelled as a demo
// in its name) that the embedded default serves and `tollgate model init` makes.
void write_demo_model(const std::string& path);

}  // namespace tollgate::local_engine
