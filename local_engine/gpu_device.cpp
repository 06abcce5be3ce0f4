// The CUDA device: weights, activations and the KV cache in device memory,
// one kernel launch per op on one stream, and per step one transfer of the
// step's small arrays in and of the sampled rows (or ids) out.
//
// Built twice from this file (local_engine/CMakeLists.txt): with
// TG_GPU_NS=cuda against the nvcc-built kernels and the CUDA runtime, and with
// TG_GPU_NS=emu against the same kernels run by the SIMT emulation on host
// memory — the device tests prove against the CPU device.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/add.cuh"
#include "kernels/argmax.cuh"
#include "kernels/attention.cuh"
#include "kernels/embed.cuh"
#include "kernels/gemm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/runtime.hpp"
#include "kernels/silu_mul.cuh"
#include "kernels/store_kv.cuh"
#include "local_engine/device.hpp"

#if !defined(TG_GPU_NS) || !defined(TG_GPU_EMULATED)
#error "build with TG_GPU_NS=cuda TG_GPU_EMULATED=0 or TG_GPU_NS=emu TG_GPU_EMULATED=1"
#endif
#define TG_CONCAT2(a, b) a##b
#define TG_CONCAT(a, b) TG_CONCAT2(a, b)

namespace tollgate::local_engine {
namespace {

namespace k = tollgate::kernels;
namespace kd = tollgate::kernels::TG_GPU_NS;

constexpr bool kEmulated = TG_GPU_EMULATED;

DeviceBuffer device_buffer(std::size_t bytes) { return {kd::device_alloc(bytes), bytes, &kd::device_free}; }

// Grows `buffer` to at least `bytes` (contents not kept).
void reserve(DeviceBuffer& buffer, std::size_t bytes) {
  if (buffer.get() == nullptr || buffer.bytes() < bytes) buffer = device_buffer(std::max<std::size_t>(bytes, 256));
}

class GpuDevice final : public Device {
 public:
  GpuDevice() : stream_(kd::create_stream()), gemm_(kd::gemm_available()) {
    const auto info = kd::device_info();
    name_ = kEmulated ? "cuda-emulated (" + info.name + ")"
                      : "cuda (" + info.name + ", sm_" + std::to_string(info.major) + std::to_string(info.minor) +
                            ", " + std::to_string(info.total_memory >> 20) + " MiB" +
                            (gemm_ ? "" : "; no cuBLAS found: prefill on the matmul kernels") + ")";
  }
  ~GpuDevice() override {
    try {
      kd::synchronize(stream_);
    } catch (...) {
    }
    weights_.clear();
    kd::destroy_stream(stream_);
  }

  std::string name() const override { return name_; }
  bool supports(DType) const override { return true; }  // F32, F16, BF16, Q8_0, Q4_0

  std::optional<std::size_t> free_memory() const override {
    std::size_t free = 0, total = 0;
    if (!kd::memory_info(free, total)) return std::nullopt;
    return free;
  }
  DeviceBuffer allocate(std::size_t bytes) override { return device_buffer(bytes); }

  Tensor upload(const Tensor& host) override {
    DeviceBuffer buffer = device_buffer(host.bytes());
    // From pageable memory the copy has read the host bytes when it returns.
    kd::copy_to_device(buffer.get(), host.data, host.bytes(), stream_);
    Tensor t = host;
    t.data = buffer.get();
    t.interleaved = nullptr;  // the CPU's rearranged copy means nothing here
    weights_.push_back(std::move(buffer));
    return t;
  }

  float* read(float* src, std::int64_t count, std::vector<float>& staging) override {
    staging.resize(static_cast<std::size_t>(count));
    kd::copy_to_host(staging.data(), src, staging.size() * sizeof(float), stream_);
    kd::synchronize(stream_);
    return staging.data();
  }

  // The step's arrays packed into one host buffer and sent in one copy:
  // slots (int64) first, then int32 ids, positions, table offsets and the
  // block tables flattened (a sequence's table once for all its tokens).
  void begin_step(const StepInputs& step, const KvCache& cache) override {
    n_ = static_cast<std::int64_t>(step.tokens.size());
    host_sample_rows_.assign(step.sample_rows.begin(), step.sample_rows.end());
    block_size_ = cache.block_size();
    max_len_ = 0;
    ints_.clear();
    for (auto t : step.tokens) ints_.push_back(t);
    for (auto p : step.positions) ints_.push_back(static_cast<std::int32_t>(p));
    const auto offsets_at = ints_.size();
    ints_.resize(ints_.size() + step.attention.size());
    const auto tables_at = ints_.size();
    const KvBlockTable* last = nullptr;
    std::int32_t last_offset = 0;
    for (std::size_t t = 0; t < step.attention.size(); ++t) {
      const auto& a = step.attention[t];
      if (a.table != last) {
        last = a.table;
        last_offset = static_cast<std::int32_t>(ints_.size() - tables_at);
        ints_.insert(ints_.end(), a.table->blocks.begin(), a.table->blocks.end());
      }
      ints_[offsets_at + t] = last_offset;
      max_len_ = std::max(max_len_, a.pos + 1);
    }
    const std::size_t slot_bytes = step.slots.size() * sizeof(std::int64_t);
    packed_.resize(slot_bytes + ints_.size() * sizeof(std::int32_t));
    std::memcpy(packed_.data(), step.slots.data(), slot_bytes);
    std::memcpy(packed_.data() + slot_bytes, ints_.data(), ints_.size() * sizeof(std::int32_t));
    reserve(step_, packed_.size());
    kd::copy_to_device(step_.get(), packed_.data(), packed_.size(), stream_);

    auto* base = static_cast<std::byte*>(step_.get());
    slots_ = reinterpret_cast<const std::int64_t*>(base);
    const auto* ints = reinterpret_cast<const std::int32_t*>(base + slot_bytes);
    tokens_ = ints;
    positions_ = ints + step.tokens.size();
    offsets_ = ints + offsets_at;
    tables_ = ints + tables_at;
  }

  void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) override {
    const auto type = static_cast<k::Type>(w.type);
    if (gemm_ && n >= k::kGemmMinTokens) {
      reserve(workspace_, k::gemm_workspace_bytes(type, n, w.rows, w.cols));
      kd::gemm({w.data, type, w.rows, w.cols, x, n, y, workspace_.get()}, stream_);
      return;
    }
    reserve(workspace_, k::matmul_workspace_bytes(type, n, w.cols));
    kd::matmul({w.data, type, w.rows, w.cols, x, n, y, workspace_.as<k::BlockQ8_0>()}, stream_);
  }

  void embed(const Tensor& table, float* out) override {
    kd::embed(table.data, static_cast<k::Type>(table.type), table.cols, tokens_, n_, out, stream_);
  }

  void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) override {
    kd::rmsnorm(x, weight.f32(), n, weight.cols, eps, out, stream_);
  }

  void rope(float* q, float* k, const AttentionShape& shape, float theta) override {
    kd::rope(q, k, positions_, n_, shape.n_heads, shape.n_kv_heads, shape.head_dim, theta, stream_);
  }

  void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v) override {
    kd::store_kv(cache.key(layer, 0), cache.value(layer, 0), k, v, slots_, n_, cache.kv_dim(), stream_);
  }

  void attention(const KvCache& cache, std::int64_t layer, const float* q, const AttentionShape& shape,
                 float* out) override {
    reserve(attention_workspace_,
            (k::attention_workspace_floats(n_, shape.n_heads, shape.head_dim, max_len_) + 1) * sizeof(float));
    k::AttentionArgs args;
    args.q = q;
    args.keys = cache.key(layer, 0);
    args.values = cache.value(layer, 0);
    args.block_tables = tables_;
    args.table_offsets = offsets_;
    args.positions = positions_;
    args.n = n_;
    args.n_heads = shape.n_heads;
    args.n_kv_heads = shape.n_kv_heads;
    args.head_dim = shape.head_dim;
    args.block_size = block_size_;
    args.max_len = max_len_;
    args.out = out;
    args.workspace = attention_workspace_.as<float>();
    kd::paged_attention(args, stream_);
  }

  void silu_mul(float* gate, const float* up, std::int64_t count) override { kd::silu_mul(gate, up, count, stream_); }
  void add(float* y, const float* x, std::int64_t count) override { kd::add(y, x, count, stream_); }

  // Row indices are known on the host already: runs of rows that move are device-to-device copies.
  void gather_sample_rows(float* x, std::int64_t dim) override {
    for (std::size_t r = 0; r < host_sample_rows_.size(); ++r) {
      const auto from = host_sample_rows_[r];
      if (from != static_cast<std::int64_t>(r)) {
        kd::copy_on_device(x + static_cast<std::int64_t>(r) * dim, x + from * dim,
                           static_cast<std::size_t>(dim) * sizeof(float), stream_);
      }
    }
  }

  void argmax(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids) override {
    reserve(ids_, static_cast<std::size_t>(rows) * sizeof(std::int32_t));
    kd::argmax(logits, rows, vocab, ids_.as<std::int32_t>(), stream_);
    kd::copy_to_host(ids, ids_.get(), static_cast<std::size_t>(rows) * sizeof(std::int32_t), stream_);
    kd::synchronize(stream_);
  }

 private:
  std::string name_;
  cudaStream_t stream_;
  bool gemm_;  // cuBLAS (or, emulated, the reference GEMM) takes prefill batches
  std::vector<DeviceBuffer> weights_;
  DeviceBuffer step_, workspace_, attention_workspace_, ids_;
  std::vector<std::int32_t> ints_;
  std::vector<std::byte> packed_;
  std::vector<std::int64_t> host_sample_rows_;
  std::int64_t n_ = 0, block_size_ = 0, max_len_ = 0;
  const std::int64_t* slots_ = nullptr;
  const std::int32_t *tokens_ = nullptr, *positions_ = nullptr, *offsets_ = nullptr, *tables_ = nullptr;
};

}  // namespace

// make_gpu_device_cuda / make_gpu_device_emu, for device_factory.cpp.
std::unique_ptr<Device> TG_CONCAT(make_gpu_device_, TG_GPU_NS)();
std::unique_ptr<Device> TG_CONCAT(make_gpu_device_, TG_GPU_NS)() {
  std::string why;
  if (!kd::device_available(why)) throw std::runtime_error(why);
  return std::make_unique<GpuDevice>();
}

}  // namespace tollgate::local_engine
