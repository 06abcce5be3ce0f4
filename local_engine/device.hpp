// The seam between the forward pass and the hardware (ggml's backend split):
// a device owns the memory it computes on — weights uploaded once, activation
// buffers allocated once per forward pass, the KV cache's storage — and runs
// a small set of ops over it. Each step, the host hands it only the step's
// small arrays (begin_step) and reads back only the rows that sample. The CPU
// device's memory is plain host memory: the seam costs it nothing. The CPU
// device is the reference every other device is tested against.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "local_engine/device_buffer.hpp"
#include "local_engine/kv_cache.hpp"
#include "local_engine/tensor.hpp"

namespace tollgate::local_engine {

// One token's view of the cache for attention: its position and its sequence's blocks.
struct AttentionToken {
  std::int64_t pos = 0;
  const KvBlockTable* table = nullptr;
};

struct AttentionShape {
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;
  std::int64_t head_dim = 0;
};

// A step's small host arrays, one entry per token of the batch. They must
// stay valid until the next begin_step.
struct StepInputs {
  std::span<const std::int32_t> tokens{};
  std::span<const std::int64_t> positions{};
  std::span<const std::int64_t> slots{};        // the cache slot each token's key and value go to
  std::span<const AttentionToken> attention{};  // what each token attends to
  std::span<const std::int64_t> sample_rows{};  // the tokens whose logits are wanted, ascending
  bool ids_only = false;                        // the step ends in argmax, not read
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  // Whether matmul takes weights of this type (asked before loading, not failed late).
  virtual bool supports(DType weight_type) const = 0;

  // --- memory -------------------------------------------------------------
  // Free device memory in bytes; nullopt for host memory (the OS decides).
  virtual std::optional<std::size_t> free_memory() const = 0;
  // Uninitialised device memory. Throws std::runtime_error when out of it.
  virtual DeviceBuffer allocate(std::size_t bytes) = 0;
  // The weight on the device, in its own type; the device keeps the copy for
  // its lifetime. The CPU device returns `host` itself.
  virtual Tensor upload(const Tensor& host) = 0;
  // `count` floats of device memory, readable on the host once this returns
  // and until the next step: `src` itself on the CPU, a host copy the device
  // owns elsewhere.
  virtual float* read(float* src, std::int64_t count) = 0;

  // --- one step -------------------------------------------------------------
  // The step's arrays, for the ops below (the CUDA device copies them over in
  // one transfer). A step is the ops called after it, ending in argmax or read
  // (or in none, when no row samples).
  //
  // Returns true when the device replays a recording of an earlier step of
  // the same shape instead (the CUDA device's graphs for decode steps): the
  // caller then calls only the step's closing argmax or read. A caller must
  // therefore call the same ops with the same buffers for steps alike in
  // their number of tokens, sample rows and ids_only; what else differs
  // (ids, positions, slots, block tables) reaches the device through here.
  virtual bool begin_step(const StepInputs& step, const KvCache& cache) = 0;

  // y (n x w.rows) = x (n x w.cols) · Wᵀ
  virtual void matmul(const Tensor& w, const float* x, std::int64_t n, float* y) = 0;
  // out (n x table.cols) = the rows of `table` of the step's tokens
  virtual void embed(const Tensor& table, float* out) = 0;
  // n rows of weight.cols each
  virtual void rmsnorm(const float* x, const Tensor& weight, std::int64_t n, float eps, float* out) = 0;
  // q (n x n_heads*head_dim) and k (n x n_kv_heads*head_dim), each token at its step position
  virtual void rope(float* q, float* k, const AttentionShape& shape, float theta) = 0;
  // Writes the step's keys and values (kv_dim each) to their slots.
  virtual void store_kv(KvCache& cache, std::int64_t layer, const float* k, const float* v) = 0;
  // Causal attention of each step token over its sequence's positions 0..pos.
  virtual void attention(const KvCache& cache, std::int64_t layer, const float* q, const AttentionShape& shape,
                         float* out) = 0;
  virtual void silu_mul(float* gate, const float* up, std::int64_t count) = 0;
  virtual void add(float* y, const float* x, std::int64_t count) = 0;
  // Moves the rows (of `dim`) of the step's sample_rows to the front of x, in order.
  virtual void gather_sample_rows(float* x, std::int64_t dim) = 0;
  // Greedy choice: ids[r] = the first index of row r's largest logit, on the host when this returns.
  virtual void argmax(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids) = 0;
};

// threads <= 0: one per hardware thread.
std::unique_ptr<Device> make_cpu_device(int threads = 0);

// The CUDA device on the first GPU. Throws std::runtime_error saying why when
// there is none usable (no driver, no device, not built with CUDA).
std::unique_ptr<Device> make_cuda_device();
// The CUDA device's code with every kernel run through the SIMT emulation on
// the host (kernels/simt): for proving it against the CPU device where no GPU
// exists. Slow: tests and small models only.
std::unique_ptr<Device> make_emulated_cuda_device();
// Whether make_cuda_device() would succeed; when not, why.
bool cuda_device_available(std::string& why);
// The first GPU's peak memory bandwidth in bytes/s (0 without one), for benchmarks.
double cuda_peak_bandwidth();

// By name, as the config and `tollgate generate --device` say it: "cpu",
// "cuda", "auto" (CUDA when a usable GPU is present, the CPU otherwise) or
// "cuda-emulated". `why` says what was picked and why. Throws
// std::runtime_error when "cuda" has no GPU, std::invalid_argument for an
// unknown name.
std::unique_ptr<Device> make_device(const std::string& name, int cpu_threads, std::string& why);

}  // namespace tollgate::local_engine
