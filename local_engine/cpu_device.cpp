#include <cmath>
#include <vector>

#include "local_engine/cpu_ops.hpp"
#include "local_engine/device.hpp"
#include "local_engine/thread_pool.hpp"

namespace tollgate::local_engine {
namespace {

class CpuDevice final : public Device {
 public:
  explicit CpuDevice(int threads) : pool_(threads) {}

  std::string name() const override { return "cpu (" + cpu::features() + ", " + std::to_string(pool_.size()) + " threads)"; }
  bool supports(DType) const override { return true; }

  void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) override { cpu::matmul(pool_, w, x, n, y); }

  void embed(const Tensor& table, std::span<const std::int32_t> tokens, float* out) override {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      cpu::dequantize_row(table, tokens[i], out + static_cast<std::int64_t>(i) * table.cols);
    }
  }

  void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) override {
    auto d = weight.cols;
    for (std::int64_t t = 0; t < n; ++t) cpu::rmsnorm(out + t * d, x + t * d, weight.f32(), d, eps);
  }

  void rope(float* q, float* k, std::span<const std::int64_t> positions, const AttentionShape& shape,
            float theta) override {
    auto q_dim = shape.n_heads * shape.head_dim;
    auto k_dim = shape.n_kv_heads * shape.head_dim;
    for (std::size_t t = 0; t < positions.size(); ++t) {
      auto i = static_cast<std::int64_t>(t);
      cpu::rope(q + i * q_dim, shape.n_heads, shape.head_dim, positions[t], theta);
      cpu::rope(k + i * k_dim, shape.n_kv_heads, shape.head_dim, positions[t], theta);
    }
  }

  void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v,
                std::span<const std::int64_t> slots) override {
    auto d = cache.kv_dim();
    for (std::size_t t = 0; t < slots.size(); ++t) {
      auto i = static_cast<std::int64_t>(t);
      std::copy(k + i * d, k + (i + 1) * d, cache.key(layer, slots[t]));
      std::copy(v + i * d, v + (i + 1) * d, cache.value(layer, slots[t]));
    }
  }

  void attention(const KvCache& cache, std::int64_t layer, const float* q, std::span<const AttentionToken> tokens,
                 const AttentionShape& shape, float* out) override {
    const auto hd = shape.head_dim;
    const auto group = shape.n_heads / shape.n_kv_heads;
    const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(hd));
    const auto units = static_cast<std::int64_t>(tokens.size()) * shape.n_heads;
    // Each (token, head) is computed whole by one thread in a fixed order, so
    // the result does not depend on the batch it runs in.
    pool_.parallel_for(units, [&](std::int64_t begin, std::int64_t end) {
      thread_local std::vector<float> scores;
      for (std::int64_t u = begin; u < end; ++u) {
        const auto t = u / shape.n_heads;
        const auto h = u % shape.n_heads;
        const auto& tok = tokens[static_cast<std::size_t>(t)];
        const float* qh = q + (t * shape.n_heads + h) * hd;
        const auto kv_offset = (h / group) * hd;
        const auto len = tok.pos + 1;
        if (static_cast<std::int64_t>(scores.size()) < len) scores.resize(static_cast<std::size_t>(len));
        for (std::int64_t p = 0; p < len; ++p) {
          scores[static_cast<std::size_t>(p)] =
              cpu::dot(qh, cache.key(layer, cache.slot(*tok.table, p)) + kv_offset, hd) * inv_sqrt;
        }
        cpu::softmax(scores.data(), len);
        float* o = out + (t * shape.n_heads + h) * hd;
        std::fill(o, o + hd, 0.0f);
        for (std::int64_t p = 0; p < len; ++p) {
          cpu::axpy(scores[static_cast<std::size_t>(p)], cache.value(layer, cache.slot(*tok.table, p)) + kv_offset, o,
                    hd);
        }
      }
    });
  }

  void silu_mul(float* gate, const float* up, std::int64_t count) override { cpu::silu_mul(gate, up, count); }
  void add(float* y, const float* x, std::int64_t count) override { cpu::add(y, x, count); }

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Device> make_cpu_device(int threads) { return std::make_unique<CpuDevice>(threads); }

}  // namespace tollgate::local_engine
