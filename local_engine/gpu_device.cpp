// The CUDA device: weights, activations and the KV cache in device memory,
// one kernel launch per op on one stream, and per step one transfer of the
// step's small arrays in and of the sampled rows (or ids) out, both through
// page-locked host buffers.
//
// Decode steps (every token samples; too few tokens for cuBLAS) run as CUDA
// graphs: a shape (tokens, ids_only, attention partitions) seen once runs
// directly, the second time it is captured, from then on its graph is
// launched as one instead of ~15 launches a layer. The kernels' arguments
// are the same for every step of one shape (buffers stay put; the attention
// length is rounded up to its partitions); ids, positions, slots and block
// tables change in device memory only. A buffer that must grow drops the
// graphs holding its address. A capture that fails turns graphs off and the
// step runs directly. TOLLGATE_CUDA_GRAPHS=0 turns them off from the start.
//
// Built twice from this file (local_engine/CMakeLists.txt): with
// TG_GPU_NS=cuda against the nvcc-built kernels and the CUDA runtime, and with
// TG_GPU_NS=emu against the same kernels run by the SIMT emulation on host
// memory — the device tests prove against the CPU device.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
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
DeviceBuffer pinned_buffer(std::size_t bytes) { return {kd::host_alloc(bytes), bytes, &kd::host_free}; }

// Graphs kept at once (each a few hundred nodes); the least recently used goes first.
constexpr std::size_t kMaxGraphs = 64;

bool graphs_wanted() {
  const char* setting = std::getenv("TOLLGATE_CUDA_GRAPHS");
  return setting == nullptr || std::string_view(setting) != "0";
}

class GpuDevice final : public Device {
 public:
  GpuDevice() : stream_(kd::create_stream()), gemm_(kd::gemm_available()), graphs_on_(graphs_wanted()) {
    const auto info = kd::device_info();
    name_ = kEmulated ? "cuda-emulated (" + info.name + ")"
                      : "cuda (" + info.name + ", sm_" + std::to_string(info.major) + std::to_string(info.minor) +
                            ", " + std::to_string(info.total_memory >> 20) + " MiB" +
                            (gemm_ ? "" : "; no cuBLAS found: prefill on the matmul kernels") + ")";
  }
  ~GpuDevice() override {
    if (mode_ == Mode::capture) abandon_capture();
    try {
      kd::synchronize(stream_);
    } catch (...) {
    }
    drop_graphs();
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

  float* read(float* src, std::int64_t count) override {
    finish_recorded();
    const auto bytes = static_cast<std::size_t>(count) * sizeof(float);
    reserve_pinned(host_logits_, bytes);
    kd::copy_to_host(host_logits_.get(), src, bytes, stream_);
    end_step();
    return host_logits_.as<float>();
  }

  // The step's arrays packed into one host buffer and sent in one copy:
  // slots (int64) first, then int32 ids, positions, table offsets and the
  // block tables flattened (a sequence's table once for all its tokens).
  bool begin_step(const StepInputs& step, const KvCache& cache) override {
    if (mode_ == Mode::capture) abandon_capture();  // the last step failed part-way
    if (in_flight_) end_step();  // the last step sampled nothing: its copy may still read the host buffer
    n_ = static_cast<std::int64_t>(step.tokens.size());
    host_sample_rows_.assign(step.sample_rows.begin(), step.sample_rows.end());
    block_size_ = cache.block_size();
    std::int64_t longest = 0;
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
      longest = std::max(longest, a.pos + 1);
    }
    // Rounded up to whole partitions: the kernels see the same length for
    // every step of one graph (a partition past a token's end does nothing).
    max_len_ = k::attention_partitions(longest) * k::kAttentionPartition;

    const std::size_t slot_bytes = step.slots.size() * sizeof(std::int64_t);
    const std::size_t bytes = slot_bytes + ints_.size() * sizeof(std::int32_t);
    reserve_pinned(host_step_, bytes);
    auto* packed = static_cast<std::byte*>(host_step_.get());
    std::memcpy(packed, step.slots.data(), slot_bytes);
    std::memcpy(packed + slot_bytes, ints_.data(), ints_.size() * sizeof(std::int32_t));
    reserve(step_, bytes);
    kd::copy_to_device(step_.get(), packed, bytes, stream_);
    in_flight_ = true;

    auto* base = static_cast<std::byte*>(step_.get());
    slots_ = reinterpret_cast<const std::int64_t*>(base);
    const auto* ints = reinterpret_cast<const std::int32_t*>(base + slot_bytes);
    tokens_ = ints;
    positions_ = ints + step.tokens.size();
    offsets_ = ints + offsets_at;
    tables_ = ints + tables_at;
    return choose_mode(step);
  }

  void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) override {
    const auto type = static_cast<k::Type>(w.type);
    if (uses_gemm(n)) {
      reserve(workspace_, k::gemm_workspace_bytes(type, n, w.rows, w.cols));
      issue([=, this] { kd::gemm({w.data, type, w.rows, w.cols, x, n, y, workspace_.get()}, stream_); });
      return;
    }
    reserve(workspace_, k::matmul_workspace_bytes(type, n, w.cols));
    issue([=, this] { kd::matmul({w.data, type, w.rows, w.cols, x, n, y, workspace_.as<k::BlockQ8_0>()}, stream_); });
  }

  void embed(const Tensor& table, float* out) override {
    issue(
        [=, this] { kd::embed(table.data, static_cast<k::Type>(table.type), table.cols, tokens_, n_, out, stream_); });
  }

  void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) override {
    issue([=, this] { kd::rmsnorm(x, weight.f32(), n, weight.cols, eps, out, stream_); });
  }

  void rope(float* q, float* k, const AttentionShape& shape, float theta) override {
    issue(
        [=, this] { kd::rope(q, k, positions_, n_, shape.n_heads, shape.n_kv_heads, shape.head_dim, theta, stream_); });
  }

  void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v) override {
    float* keys = cache.key(layer, 0);
    float* values = cache.value(layer, 0);
    const auto kv_dim = cache.kv_dim();
    issue([=, this] { kd::store_kv(keys, values, k, v, slots_, n_, kv_dim, stream_); });
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
    issue([=, this] { kd::paged_attention(args, stream_); });
  }

  void silu_mul(float* gate, const float* up, std::int64_t count) override {
    issue([=, this] { kd::silu_mul(gate, up, count, stream_); });
  }
  void add(float* y, const float* x, std::int64_t count) override {
    issue([=, this] { kd::add(y, x, count, stream_); });
  }

  // Row indices are known on the host already: runs of rows that move are device-to-device copies.
  void gather_sample_rows(float* x, std::int64_t dim) override {
    for (std::size_t r = 0; r < host_sample_rows_.size(); ++r) {
      const auto from = host_sample_rows_[r];
      if (from != static_cast<std::int64_t>(r)) {
        float* to = x + static_cast<std::int64_t>(r) * dim;
        const float* row = x + from * dim;
        issue([=, this] { kd::copy_on_device(to, row, static_cast<std::size_t>(dim) * sizeof(float), stream_); });
      }
    }
  }

  void argmax(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids) override {
    const auto bytes = static_cast<std::size_t>(rows) * sizeof(std::int32_t);
    if (mode_ != Mode::replay) {
      reserve(ids_, bytes);
      auto* out = ids_.as<std::int32_t>();
      issue([=, this] { kd::argmax(logits, rows, vocab, out, stream_); });
    }
    finish_recorded();
    reserve_pinned(host_ids_, bytes);
    kd::copy_to_host(host_ids_.get(), ids_.get(), bytes, stream_);
    end_step();
    std::memcpy(ids, host_ids_.get(), bytes);
  }

 private:
  // How this step's ops reach the device: launched one by one, captured into
  // a graph (launched when the step's output is asked for), or not at all
  // because the step's graph is replayed.
  enum class Mode { direct, capture, replay };
  struct Shape {
    std::int64_t tokens = 0;
    bool ids_only = false;
    std::int64_t partitions = 0;
    auto operator<=>(const Shape&) const = default;
  };
  struct Recorded {
    kd::Graph* graph = nullptr;
    std::uint64_t used = 0;
  };

  bool uses_gemm(std::int64_t n) const { return gemm_ && n >= k::kGemmMinTokens; }

  // Issues an op's launches; while capturing, keeps the op too, to issue it
  // directly should the capture fail.
  template <typename Op>
  void issue(Op op) {
    if (mode_ == Mode::capture) fallback_.emplace_back(op);
    op();
  }

  // Decode steps are graphs: every token samples (no rows move), and no
  // cuBLAS call (a library's launches are not ours to keep constant).
  bool choose_mode(const StepInputs& step) {
    mode_ = Mode::direct;
    if (!graphs_on_ || n_ == 0 || uses_gemm(n_) || host_sample_rows_.size() != static_cast<std::size_t>(n_)) {
      return false;
    }
    shape_ = {n_, step.ids_only, k::attention_partitions(max_len_)};
    if (auto it = graphs_.find(shape_); it != graphs_.end()) {
      it->second.used = ++clock_;
      mode_ = Mode::replay;
      return true;
    }
    // The first step of a shape runs directly and sizes every buffer it
    // needs, so the second one's capture finds them in place.
    if (seen_.insert(shape_).second) {
      if (seen_.size() > 16 * kMaxGraphs) seen_ = {shape_};
      return false;
    }
    kd::begin_capture(stream_);
    mode_ = Mode::capture;
    spoiled_ = false;
    return false;
  }

  // Ends the step's ops: launches its graph (capturing it first when this is
  // the capturing step). A capture that fails turns graphs off; the step's
  // ops then run directly.
  void finish_recorded() {
    if (mode_ == Mode::replay) {
      kd::launch_graph(graphs_.at(shape_).graph, stream_);
    } else if (mode_ == Mode::capture) {
      mode_ = Mode::direct;
      auto ops = std::move(fallback_);
      fallback_.clear();
      kd::Graph* graph = nullptr;
      try {
        graph = kd::end_capture(stream_);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "tollgate: capturing a CUDA graph failed (%s): decode steps run without graphs\n",
                     e.what());
        graphs_on_ = false;
        drop_graphs();
        for (auto& op : ops) op();
        return;
      }
      kd::launch_graph(graph, stream_);
      if (spoiled_) {
        spoiled_graph_ = graph;  // it holds a buffer that moved: destroyed once it has run
      } else {
        keep(graph);
      }
    }
  }

  void abandon_capture() {
    mode_ = Mode::direct;
    fallback_.clear();
    try {
      kd::destroy_graph(kd::end_capture(stream_));
    } catch (const std::exception&) {
    }
  }

  // Waits for the step's work; frees what it no longer needs.
  void end_step() {
    in_flight_ = false;
    kd::synchronize(stream_);
    kd::destroy_graph(spoiled_graph_);
    spoiled_graph_ = nullptr;
    retired_.clear();
    mode_ = Mode::direct;
  }

  void keep(kd::Graph* graph) {
    if (graphs_.size() >= kMaxGraphs) {
      auto oldest = std::min_element(graphs_.begin(), graphs_.end(),
                                     [](const auto& a, const auto& b) { return a.second.used < b.second.used; });
      kd::destroy_graph(oldest->second.graph);
      graphs_.erase(oldest);
    }
    graphs_[shape_] = {graph, ++clock_};
  }

  void drop_graphs() {
    for (auto& [shape, recorded] : graphs_) kd::destroy_graph(recorded.graph);
    graphs_.clear();
  }

  // Grows `buffer` to at least `bytes` (contents not kept; twice that, so
  // growing is rare). The old buffer lives until the step ends (kernels
  // launched before may read it) and the graphs holding it are dropped; a
  // capture under way is launched once and then dropped too.
  void reserve(DeviceBuffer& buffer, std::size_t bytes) {
    if (buffer.get() != nullptr && buffer.bytes() >= bytes) return;
    if (buffer.get() != nullptr) {
      retired_.push_back(std::move(buffer));
      drop_graphs();
      if (mode_ == Mode::capture) spoiled_ = true;
      bytes = std::max(bytes, 2 * retired_.back().bytes());
    }
    buffer = device_buffer(std::max<std::size_t>(bytes, 256));
  }

  // Grows a page-locked buffer to at least `bytes` (twice that: allocating
  // page-locked memory is slow). Only between copies: no copy in flight uses it.
  static void reserve_pinned(DeviceBuffer& buffer, std::size_t bytes) {
    if (buffer.bytes() >= bytes) return;
    buffer = {};
    buffer = pinned_buffer(std::max<std::size_t>(2 * bytes, 4096));
  }

  std::string name_;
  cudaStream_t stream_;
  bool gemm_;       // cuBLAS (or, emulated, the reference GEMM) takes prefill batches
  bool graphs_on_;  // decode steps run as graphs
  std::vector<DeviceBuffer> weights_;
  DeviceBuffer step_, workspace_, attention_workspace_, ids_;
  DeviceBuffer host_step_, host_ids_, host_logits_;  // page-locked
  std::vector<DeviceBuffer> retired_;
  std::vector<std::int32_t> ints_;
  std::vector<std::int64_t> host_sample_rows_;
  std::int64_t n_ = 0, block_size_ = 0, max_len_ = 0;
  const std::int64_t* slots_ = nullptr;
  const std::int32_t *tokens_ = nullptr, *positions_ = nullptr, *offsets_ = nullptr, *tables_ = nullptr;
  bool in_flight_ = false;  // a step's copies or kernels may still run

  Mode mode_ = Mode::direct;
  Shape shape_;
  std::map<Shape, Recorded> graphs_;
  std::set<Shape> seen_;
  std::uint64_t clock_ = 0;
  bool spoiled_ = false;
  kd::Graph* spoiled_graph_ = nullptr;
  std::vector<std::function<void()>> fallback_;  // the capturing step's ops
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
