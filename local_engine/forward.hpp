// The Llama decoder's forward pass over one step's batch of tokens — prefill
// chunks and decode tokens of many sequences together — written once against
// the Device ops.
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

class ForwardPass {
 public:
  // Buffers for up to max_tokens tokens a step (and as many logits rows) are
  // allocated here, once.
  ForwardPass(const Model& model, Device& device, KvCache& cache, std::int64_t max_tokens);

  // Writes every token's keys and values to the cache and returns the logits
  // (vocab floats each) of the tokens that want them, in batch order. The
  // span stays valid until the next call.
  std::span<float> run(std::span<const BatchToken> batch);

 private:
  const Model& model_;
  Device& device_;
  KvCache& cache_;
  std::int64_t max_tokens_;
  AttentionShape shape_;
  std::vector<float> x_, xb_, q_, k_, v_, att_, gate_, up_, logits_;
  std::vector<std::int32_t> ids_;
  std::vector<std::int64_t> positions_, slots_;
  std::vector<AttentionToken> attention_tokens_;
};

}  // namespace tollgate::local_engine
