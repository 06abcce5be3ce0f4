#include "local_engine/forward.hpp"

#include <stdexcept>
#include <string>

namespace tollgate::local_engine {

namespace {

template <typename Fn>
void for_each_weight(const Model& model, Fn&& fn) {
  fn(model.token_embedding);
  fn(model.output_norm);
  if (model.output.data != model.token_embedding.data) fn(model.output);
  for (const auto& l : model.layers) {
    for (const Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_down, &l.w_up}) {
      fn(*t);
    }
  }
}

}  // namespace

std::size_t ForwardPass::weight_bytes(const Model& model) {
  std::size_t bytes = 0;
  for_each_weight(model, [&](const Tensor& t) { bytes += t.bytes(); });
  return bytes;
}

ForwardPass::ForwardPass(const Model& model, Device& device, KvCache& cache, std::int64_t max_tokens)
    : model_(model), device_(device), cache_(cache), max_tokens_(max_tokens) {
  const auto& p = model.params;
  shape_ = {p.n_heads, p.n_kv_heads, p.head_dim()};

  token_embedding_ = device.upload(model.token_embedding);
  output_norm_ = device.upload(model.output_norm);
  // A tied classifier is the embedding itself: uploaded once.
  output_ = model.output.data == model.token_embedding.data ? token_embedding_ : device.upload(model.output);
  for (const auto& w : model.layers) {
    layers_.push_back({device.upload(w.attn_norm), device.upload(w.wq), device.upload(w.wk), device.upload(w.wv),
                       device.upload(w.wo), device.upload(w.ffn_norm), device.upload(w.w_gate),
                       device.upload(w.w_down), device.upload(w.w_up)});
  }

  auto floats = [&](std::int64_t per_token) {
    return device.allocate(static_cast<std::size_t>(max_tokens * per_token) * sizeof(float));
  };
  const auto kv_dim = p.n_kv_heads * p.head_dim();
  x_ = floats(p.dim);
  xb_ = floats(p.dim);
  q_ = floats(p.dim);
  k_ = floats(kv_dim);
  v_ = floats(kv_dim);
  att_ = floats(p.dim);
  gate_ = floats(p.hidden_dim);
  up_ = floats(p.hidden_dim);
  logits_ = floats(p.vocab_size);
  auto n = static_cast<std::size_t>(max_tokens);
  ids_.reserve(n);
  sampled_.resize(n);
  positions_.reserve(n);
  slots_.reserve(n);
  sample_rows_.reserve(n);
  attention_tokens_.reserve(n);
}

StepOutput ForwardPass::run(std::span<const BatchToken> batch, bool ids_only) {
  const auto& p = model_.params;
  const auto n = static_cast<std::int64_t>(batch.size());
  if (n <= 0 || n > max_tokens_) {
    // The scheduler never builds such a step; writing it would overrun every buffer.
    throw std::logic_error("forward pass: a step of " + std::to_string(n) + " tokens (at most " +
                           std::to_string(max_tokens_) + ")");
  }

  ids_.clear();
  positions_.clear();
  slots_.clear();
  sample_rows_.clear();
  attention_tokens_.clear();
  for (std::int64_t t = 0; t < n; ++t) {
    const auto& token = batch[static_cast<std::size_t>(t)];
    ids_.push_back(token.token);
    positions_.push_back(token.pos);
    slots_.push_back(cache_.slot(*token.table, token.pos));
    attention_tokens_.push_back({token.pos, token.table});
    if (token.wants_logits) sample_rows_.push_back(t);
  }
  const bool recorded =
      device_.begin_step({ids_, positions_, slots_, attention_tokens_, sample_rows_, ids_only}, cache_);
  if (!recorded) compute(n);

  const auto rows = static_cast<std::int64_t>(sample_rows_.size());
  if (rows == 0) return {};
  auto* logits = logits_.as<float>();
  if (ids_only) {
    device_.argmax(logits, rows, p.vocab_size, sampled_.data());
    return {{}, {sampled_.data(), static_cast<std::size_t>(rows)}};
  }
  const auto count = rows * p.vocab_size;
  return {{device_.read(logits, count), static_cast<std::size_t>(count)}, {}};
}

void ForwardPass::compute(std::int64_t n) {
  const auto& p = model_.params;
  const auto dim = p.dim;
  auto* x = x_.as<float>();
  auto* xb = xb_.as<float>();
  auto* q = q_.as<float>();
  auto* k = k_.as<float>();
  auto* v = v_.as<float>();
  auto* att = att_.as<float>();
  auto* gate = gate_.as<float>();
  auto* up = up_.as<float>();
  device_.embed(token_embedding_, x);
  for (const auto& w : layers_) {
    const auto l = &w - layers_.data();
    device_.rmsnorm(x, w.attn_norm, n, p.rms_eps, xb);
    device_.matmul(w.wq, xb, n, q);
    device_.matmul(w.wk, xb, n, k);
    device_.matmul(w.wv, xb, n, v);
    device_.rope(q, k, shape_, p.rope_theta);
    // All of the step's keys and values go in first, so a prefill chunk's
    // tokens attend to each other (causally, by position).
    device_.store_kv(cache_, l, k, v);
    device_.attention(cache_, l, q, shape_, att);
    device_.matmul(w.wo, att, n, xb);
    device_.add(x, xb, n * dim);

    device_.rmsnorm(x, w.ffn_norm, n, p.rms_eps, xb);
    device_.matmul(w.w_gate, xb, n, gate);
    device_.matmul(w.w_up, xb, n, up);
    device_.silu_mul(gate, up, n * p.hidden_dim);
    device_.matmul(w.w_down, gate, n, xb);
    device_.add(x, xb, n * dim);
  }

  // Only the tokens that sample need the classifier: gather their rows.
  const auto rows = static_cast<std::int64_t>(sample_rows_.size());
  if (rows == 0) return;
  device_.gather_sample_rows(x, dim);
  device_.rmsnorm(x, output_norm_, rows, p.rms_eps, xb);
  device_.matmul(output_, xb, rows, logits_.as<float>());
}

}  // namespace tollgate::local_engine
