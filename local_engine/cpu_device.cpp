#include <cmath>
#include <cstring>
#include <vector>

#include "local_engine/cpu_ops.hpp"
#include "local_engine/device.hpp"
#include "local_engine/sampler.hpp"
#include "local_engine/thread_pool.hpp"

namespace tollgate::local_engine {
namespace {

class CpuDevice final : public Device {
 public:
  explicit CpuDevice(int threads) : pool_(threads) {}

  std::string name() const override {
    return "cpu (" + cpu::features() + ", " + std::to_string(pool_.size()) + " threads)";
  }
  bool supports(DType) const override { return true; }

  // Host memory all the way: nothing is copied.
  std::optional<std::size_t> free_memory() const override { return std::nullopt; }
  DeviceBuffer allocate(std::size_t bytes) override { return host_buffer(bytes); }
  Tensor upload(const Tensor& host) override { return host; }
  float* read(float* src, std::int64_t) override { return src; }

  bool begin_step(const StepInputs& step, const KvCache& cache) override {
    step_ = step;
    collect_slots(cache, step.attention);
    return false;
  }

  void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) override { cpu::matmul(pool_, w, x, n, y); }

  void embed(const Tensor& table, float* out) override {
    for (std::size_t i = 0; i < step_.tokens.size(); ++i) {
      cpu::dequantize_row(table, step_.tokens[i], out + static_cast<std::int64_t>(i) * table.cols);
    }
  }

  // The per-token and elementwise ops run on the pool too: in a batched step
  // on a few cores, each left to one thread cost as much as a matmul. Every
  // element is computed the same way whichever thread takes it.
  void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) override {
    auto d = weight.cols;
    pool_.parallel_for(n, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t t = begin; t < end; ++t) cpu::rmsnorm(out + t * d, x + t * d, weight.f32(), d, eps);
    });
  }

  void rope(float* q, float* k, const AttentionShape& shape, float theta) override {
    const auto positions = step_.positions;
    auto q_dim = shape.n_heads * shape.head_dim;
    auto k_dim = shape.n_kv_heads * shape.head_dim;
    pool_.parallel_for(static_cast<std::int64_t>(positions.size()), [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t t = begin; t < end; ++t) {
        const auto pos = positions[static_cast<std::size_t>(t)];
        cpu::rope(q + t * q_dim, shape.n_heads, shape.head_dim, pos, theta);
        cpu::rope(k + t * k_dim, shape.n_kv_heads, shape.head_dim, pos, theta);
      }
    });
  }

  void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v) override {
    const auto slots = step_.slots;
    auto d = cache.kv_dim();
    for (std::size_t t = 0; t < slots.size(); ++t) {
      auto i = static_cast<std::int64_t>(t);
      std::copy(k + i * d, k + (i + 1) * d, cache.key(layer, slots[t]));
      std::copy(v + i * d, v + (i + 1) * d, cache.value(layer, slots[t]));
    }
  }

  void attention(const KvCache& cache, std::int64_t layer, const float* q, const AttentionShape& shape,
                 float* out) override {
    const auto tokens = step_.attention;
    const auto hd = shape.head_dim;
    const auto group = shape.n_heads / shape.n_kv_heads;
    const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(hd));
    const std::int64_t* slots = slots_.data();
    const float* keys = cache.key(layer, 0);
    const float* values = cache.value(layer, 0);
    const auto units = static_cast<std::int64_t>(tokens.size()) * shape.n_heads;
    // Each (token, head) is computed whole by one thread in a fixed order, so
    // the result does not depend on the batch it runs in. Sequences differ in
    // length: several chunks per thread even the threads out.
    pool_.parallel_for(
        units,
        [&](std::int64_t begin, std::int64_t end) {
          thread_local std::vector<float> scores;
          for (std::int64_t u = begin; u < end; ++u) {
            const auto t = u / shape.n_heads;
            const auto h = u % shape.n_heads;
            const auto len = tokens[static_cast<std::size_t>(t)].pos + 1;
            if (static_cast<std::int64_t>(scores.size()) < len) scores.resize(static_cast<std::size_t>(len));
            const auto kv_offset = (h / group) * hd;
            cpu::attend(q + (t * shape.n_heads + h) * hd, keys + kv_offset, values + kv_offset, cache.kv_dim(),
                        slots + slot_begin_[static_cast<std::size_t>(t)], len, hd, inv_sqrt, scores.data(),
                        out + (t * shape.n_heads + h) * hd);
          }
        },
        4);
  }

  void silu_mul(float* gate, const float* up, std::int64_t count) override {
    // A vectorised exp is ~1 ns an element: one token's worth runs inline.
    elementwise(count, 8192,
                [&](std::int64_t begin, std::int64_t end) { cpu::silu_mul(gate + begin, up + begin, end - begin); });
  }
  void add(float* y, const float* x, std::int64_t count) override {
    elementwise(count, 8192,
                [&](std::int64_t begin, std::int64_t end) { cpu::add(y + begin, x + begin, end - begin); });
  }

  void gather_sample_rows(float* x, std::int64_t dim) override {
    std::int64_t row = 0;
    for (auto t : step_.sample_rows) {
      if (t != row) std::memcpy(x + row * dim, x + t * dim, static_cast<std::size_t>(dim) * sizeof(float));
      ++row;
    }
  }

  void argmax(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids) override {
    for (std::int64_t r = 0; r < rows; ++r) {
      ids[r] = local_engine::argmax(logits + r * vocab, static_cast<std::int32_t>(vocab));
    }
  }

 private:
  // fn(begin, end) over [0, count) in pieces of at least `grain` elements.
  template <typename Fn>
  void elementwise(std::int64_t count, std::int64_t grain, Fn&& fn) {
    const std::int64_t pieces = (count + grain - 1) / grain;
    pool_.parallel_for(pieces,
                       [&](std::int64_t begin, std::int64_t end) { fn(begin * count / pieces, end * count / pieces); });
  }

  // The slots of each token's positions 0..pos into slots_, from
  // slot_begin_[t]. A token of the same sequence as a later token with at
  // least as many positions (a prefill's earlier tokens) shares its list.
  void collect_slots(const KvCache& cache, std::span<const AttentionToken> tokens) {
    slots_.clear();
    slot_begin_.resize(tokens.size());
    const KvBlockTable* listed = nullptr;
    std::int64_t listed_len = 0;
    std::size_t listed_begin = 0;
    for (std::size_t i = tokens.size(); i-- > 0;) {
      const auto len = tokens[i].pos + 1;
      if (tokens[i].table != listed || len > listed_len) {
        listed = tokens[i].table;
        listed_len = len;
        listed_begin = slots_.size();
        for (std::int64_t p = 0; p < len; ++p) slots_.push_back(cache.slot(*listed, p));
      }
      slot_begin_[i] = listed_begin;
    }
  }

  ThreadPool pool_;
  StepInputs step_;
  // Reused across calls: they only grow, so a warm engine does not allocate.
  std::vector<std::int64_t> slots_;
  std::vector<std::size_t> slot_begin_;
};

}  // namespace

std::unique_ptr<Device> make_cpu_device(int threads) { return std::make_unique<CpuDevice>(threads); }

}  // namespace tollgate::local_engine
