#include "local_engine/forward.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

namespace tollgate::local_engine {

ForwardPass::ForwardPass(const Model& model, Device& device, KvCache& cache, std::int64_t max_tokens)
    : model_(model), device_(device), cache_(cache), max_tokens_(max_tokens) {
  const auto& p = model.params;
  shape_ = {p.n_heads, p.n_kv_heads, p.head_dim()};
  auto n = static_cast<std::size_t>(max_tokens);
  auto kv_dim = static_cast<std::size_t>(p.n_kv_heads * p.head_dim());
  x_.resize(n * p.dim);
  xb_.resize(n * p.dim);
  q_.resize(n * p.dim);
  k_.resize(n * kv_dim);
  v_.resize(n * kv_dim);
  att_.resize(n * p.dim);
  gate_.resize(n * p.hidden_dim);
  up_.resize(n * p.hidden_dim);
  logits_.resize(n * p.vocab_size);
  ids_.reserve(n);
  positions_.reserve(n);
  slots_.reserve(n);
  attention_tokens_.reserve(n);
}

std::span<float> ForwardPass::run(std::span<const BatchToken> batch) {
  const auto& p = model_.params;
  const auto n = static_cast<std::int64_t>(batch.size());
  if (n <= 0 || n > max_tokens_) {
    // The scheduler never builds such a step; writing it would overrun every buffer.
    throw std::logic_error("forward pass: a step of " + std::to_string(n) + " tokens (at most " +
                           std::to_string(max_tokens_) + ")");
  }
  const auto dim = p.dim;

  ids_.clear();
  positions_.clear();
  slots_.clear();
  attention_tokens_.clear();
  for (const auto& t : batch) {
    ids_.push_back(t.token);
    positions_.push_back(t.pos);
    slots_.push_back(cache_.slot(*t.table, t.pos));
    attention_tokens_.push_back({t.pos, t.table});
  }

  device_.embed(model_.token_embedding, ids_, x_.data());
  for (std::int64_t l = 0; l < p.n_layers; ++l) {
    const auto& w = model_.layers[static_cast<std::size_t>(l)];
    device_.rmsnorm(x_.data(), w.attn_norm, n, p.rms_eps, xb_.data());
    device_.matmul(w.wq, xb_.data(), n, q_.data());
    device_.matmul(w.wk, xb_.data(), n, k_.data());
    device_.matmul(w.wv, xb_.data(), n, v_.data());
    device_.rope(q_.data(), k_.data(), positions_, shape_, p.rope_theta);
    // All of the step's keys and values go in first, so a prefill chunk's
    // tokens attend to each other (causally, by position).
    device_.store_kv(cache_, l, k_.data(), v_.data(), slots_);
    device_.attention(cache_, l, q_.data(), attention_tokens_, shape_, att_.data());
    device_.matmul(w.wo, att_.data(), n, xb_.data());
    device_.add(x_.data(), xb_.data(), n * dim);

    device_.rmsnorm(x_.data(), w.ffn_norm, n, p.rms_eps, xb_.data());
    device_.matmul(w.w_gate, xb_.data(), n, gate_.data());
    device_.matmul(w.w_up, xb_.data(), n, up_.data());
    device_.silu_mul(gate_.data(), up_.data(), n * p.hidden_dim);
    device_.matmul(w.w_down, gate_.data(), n, xb_.data());
    device_.add(x_.data(), xb_.data(), n * dim);
  }

  // Only the tokens that sample need the classifier: gather their rows.
  std::int64_t rows = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    if (!batch[static_cast<std::size_t>(t)].wants_logits) continue;
    if (rows != t) std::memcpy(&x_[rows * dim], &x_[t * dim], static_cast<std::size_t>(dim) * sizeof(float));
    ++rows;
  }
  if (rows == 0) return {};
  device_.rmsnorm(x_.data(), model_.output_norm, rows, p.rms_eps, xb_.data());
  device_.matmul(model_.output, xb_.data(), rows, logits_.data());
  return {logits_.data(), static_cast<std::size_t>(rows * p.vocab_size)};
}

}  // namespace tollgate::local_engine
