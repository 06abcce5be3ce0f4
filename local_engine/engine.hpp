// The in-process engine: one thread that loops schedule -> forward -> sample
// over every running request (continuous batching over a paged KV cache), and
// streams each request's text to its callback as tokens are produced.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "local_engine/device.hpp"
#include "local_engine/model.hpp"
#include "local_engine/sampler.hpp"
#include "local_engine/tokenizer.hpp"

namespace tollgate::local_engine {

struct EngineConfig {
  std::int64_t max_num_seqs = 16;
  std::int64_t max_num_batched_tokens = 512;  // per step: decode tokens and prefill chunks together
  std::int64_t max_model_len = 0;             // prompt + output; 0: the file's context length, at most 8192
  std::int64_t kv_cache_bytes = 0;            // 0: room for max_num_seqs sequences of max_model_len
  std::int64_t block_size = 16;               // tokens per KV block
  std::int64_t max_waiting = 256;  // waiting beyond free sequence slots; past it, submit() answers overloaded
  bool prefix_caching = true;      // share the KV blocks of prompts' common beginnings
  int threads = 0;                 // compute threads; 0: one per core
};

struct GenerationRequest {
  std::vector<std::int32_t> prompt;  // token ids, BOS included where the model wants it
  SamplingParams sampling;
  std::int64_t max_tokens = 0;  // 0: until EOS or max_model_len
  std::vector<std::string> stop;
  // Report each generated token's log-probability with this many most likely
  // alternatives; -1: none. Taken from the model's raw distribution, before
  // temperature, penalties and truncation (as vLLM reports them).
  std::int32_t logprobs = -1;
};

struct GenerationEvent {
  enum class Type { text, done, error };
  Type type = Type::text;
  std::string text;                     // text: valid UTF-8, never inside a stop sequence
  std::vector<TokenLogprobs> logprobs;  // text, when asked for: the tokens that produced it
  std::string finish_reason;            // done: "stop" (EOS or a stop sequence) or "length"
  std::string error;                    // error
  std::int64_t prompt_tokens = 0;       // every event: the counts so far (text: a running count)
  std::int64_t completion_tokens = 0;
  std::int64_t cached_prompt_tokens = 0;  // done: of the prompt, found in the prefix cache
  std::vector<std::int32_t> tokens;       // done: the generated ids
};

// Called on the engine thread, in order; nothing follows `done` or `error`.
using GenerationCallback = std::function<void(GenerationEvent)>;

struct EngineStats {
  std::int64_t running = 0;
  std::int64_t waiting = 0;
  double kv_cache_usage = 0;  // 0..1
  std::int64_t num_preemptions = 0;
  std::int64_t prefix_cache_queries = 0;  // prompt tokens admitted
  std::int64_t prefix_cache_hits = 0;     // of them, found in the cache
};

// Timings the engine reports as it goes, on its own thread (for metrics named
// after vLLM's).
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void on_scheduled(double queue_seconds, std::int64_t prompt_tokens) = 0;  // first admitted
  virtual void on_first_token(double ttft_seconds) = 0;                             // from submit
  virtual void on_token(double inter_token_seconds) = 0;                            // every later token
  virtual void on_step(const EngineStats& stats) = 0;                               // after every step
};

class Engine {
 public:
  // Starts the engine thread. Throws ModelError when the device cannot run the model.
  Engine(Model model, EngineConfig config, std::unique_ptr<Device> device, EngineObserver* observer = nullptr);
  ~Engine();  // stops the thread; running requests get an error event
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  enum class Refusal { none, overloaded, too_long, invalid };
  struct Submission {
    std::uint64_t id = 0;
    Refusal refusal = Refusal::none;
    std::string message;
  };
  // Queues a request (it joins the next step); refuses at once when the
  // waiting queue is full or the prompt cannot fit.
  Submission submit(GenerationRequest request, GenerationCallback callback);
  // Frees the request's sequence at the next step; no event follows.
  void cancel(std::uint64_t id);

  const Model& model() const { return model_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  const EngineConfig& config() const { return config_; }
  std::string device_name() const { return device_->name(); }
  EngineStats stats() const;

 private:
  struct Live;
  void run();
  void admit_and_cancel();
  void step();
  void emit_token(Live& live, std::int32_t token);
  // `flush_logprobs`: report logprobs still held (the ending token's) before the final event.
  void finish(Live& live, const std::string& reason, bool flush_logprobs = false);

  Model model_;
  Tokenizer tokenizer_;
  EngineConfig config_;
  std::unique_ptr<Device> device_;
  EngineObserver* observer_;
  struct State;
  std::unique_ptr<State> state_;  // scheduler, cache, forward pass: engine thread only

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Live>> inbox_;
  std::vector<std::uint64_t> cancels_;
  std::uint64_t next_id_ = 1;
  bool stopping_ = false;

  std::atomic<std::int64_t> running_{0};
  std::atomic<std::int64_t> waiting_{0};
  std::atomic<double> kv_usage_{0};
  std::atomic<std::int64_t> preemptions_{0};
  std::atomic<std::int64_t> prefix_queries_{0};
  std::atomic<std::int64_t> prefix_hits_{0};
  std::thread thread_;
};

}  // namespace tollgate::local_engine
