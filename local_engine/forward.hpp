// The Llama decoder's forward pass over one step's batch of tokens — prefill
// chunks and decode tokens of many sequences together — written once against
// the Device ops, on buffers the device owns.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "local_engine/device.hpp"
#include "local_engine/kv_cache.hpp"
#include "local_engine/model.hpp"

namespace tollgate::local_engine {

struct BatchToken {
  std::int32_t token = 0;
  std::int64_t pos = 0;
  const KvBlockTable* table = nullptr;  // its sequence's blocks, covering pos
  bool wants_logits = false;
};

// What a step sends back for the tokens that want logits, in batch order.
struct StepOutput {
  std::span<float> logits;            // vocab floats a row, on the host; empty when only ids were asked
  std::span<const std::int32_t> ids;  // with ids_only: each row's argmax
};

class ForwardPass {
 public:
  // Uploads the model's weights to the device and allocates buffers for up
  // to max_tokens tokens a step (and as many logits rows), once. The cache's
  // storage must be the device's.
  ForwardPass(const Model& model, Device& device, KvCache& cache, std::int64_t max_tokens);

  // Writes every token's keys and values to the cache and returns what the
  // tokens that want logits produced: their logits, or with `ids_only` only
  // their greedy choices (the logits stay on the device). The spans stay
  // valid until the next call.
  StepOutput run(std::span<const BatchToken> batch, bool ids_only = false);

  // Bytes the weights take on the device.
  static std::size_t weight_bytes(const Model& model);

 private:
  // The step's ops up to the sampled rows' logits (in logits_), or only its
  // keys and values when no row samples.
  void compute(std::int64_t n);

  struct Layer {
    Tensor attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_down, w_up;
  };
  const Model& model_;
  Device& device_;
  KvCache& cache_;
  std::int64_t max_tokens_;
  AttentionShape shape_;
  Tensor token_embedding_, output_norm_, output_;
  std::vector<Layer> layers_;
  DeviceBuffer x_, xb_, q_, k_, v_, att_, gate_, up_, logits_;
  std::vector<std::int32_t> ids_, sampled_;
  std::vector<std::int64_t> positions_, slots_, sample_rows_;
  std::vector<AttentionToken> attention_tokens_;
};

}  // namespace tollgate::local_engine
