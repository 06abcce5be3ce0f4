#include "backends/local.hpp"

#include <yaml-cpp/yaml.h>

#include <atomic>
#include <filesystem>
#include <iostream>
#include <optional>
#include <random>
#include <stdexcept>

#include "backends/config_reader.hpp"
#include "local_engine/chat_template.hpp"
#include "metering/metrics.hpp"

namespace tollgate::backends {
namespace {

namespace le = local_engine;

// The engine's metrics, named after vLLM's, one series per local backend.
class EngineMetrics final : public le::EngineObserver {
 public:
  EngineMetrics(metering::Registry& r, const std::string& backend)
      : running_(r.gauge("tollgate_engine_num_requests_running", "Requests in the engine's running batch.", {"backend"})
                     .labels({backend})),
        waiting_(r.gauge("tollgate_engine_num_requests_waiting", "Requests waiting for the engine.", {"backend"})
                     .labels({backend})),
        kv_usage_(
            r.gauge("tollgate_engine_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", {"backend"})
                .labels({backend})),
        preemptions_(r.counter("tollgate_engine_num_preemptions_total",
                               "Requests preempted (KV blocks freed, recomputed later).", {"backend"})
                         .labels({backend})),
        prompt_tokens_(r.counter("tollgate_engine_prompt_tokens_total", "Prompt tokens prefilled.", {"backend"})
                           .labels({backend})),
        generation_tokens_(
            r.counter("tollgate_engine_generation_tokens_total", "Tokens generated.", {"backend"}).labels({backend})),
        ttft_(r.histogram("tollgate_engine_time_to_first_token_seconds", "Submit to first generated token.",
                          {"backend"}, metering::latency_buckets())
                  .labels({backend})),
        itl_(r.histogram("tollgate_engine_inter_token_latency_seconds", "Time between two generated tokens.",
                         {"backend"}, metering::latency_buckets())
                 .labels({backend})),
        queue_(r.histogram("tollgate_engine_request_queue_time_seconds", "Submit to first scheduled step.", {"backend"},
                           metering::latency_buckets())
                   .labels({backend})),
        prefix_queries_(r.counter("tollgate_engine_prefix_cache_queries_total",
                                  "Prompt tokens admitted, looked up in the prefix cache.", {"backend"})
                            .labels({backend})),
        prefix_hits_(r.counter("tollgate_engine_prefix_cache_hits_total",
                               "Prompt tokens found in the prefix cache (not computed again).", {"backend"})
                         .labels({backend})) {}

  void on_scheduled(double queue_seconds, std::int64_t prompt_tokens) override {
    queue_.observe(queue_seconds);
    prompt_tokens_.inc(static_cast<double>(prompt_tokens));
  }
  void on_first_token(double ttft_seconds) override {
    ttft_.observe(ttft_seconds);
    generation_tokens_.inc();
  }
  void on_token(double inter_token_seconds) override {
    itl_.observe(inter_token_seconds);
    generation_tokens_.inc();
  }
  void on_step(const le::EngineStats& s) override {
    running_.set(static_cast<double>(s.running));
    waiting_.set(static_cast<double>(s.waiting));
    kv_usage_.set(s.kv_cache_usage);
    catch_up(preemptions_, s.num_preemptions);
    catch_up(prefix_queries_, s.prefix_cache_queries);
    catch_up(prefix_hits_, s.prefix_cache_hits);
  }

 private:
  metering::Gauge& running_;
  metering::Gauge& waiting_;
  metering::Gauge& kv_usage_;
  metering::Counter& preemptions_;
  metering::Counter& prompt_tokens_;
  metering::Counter& generation_tokens_;
  metering::Histogram& ttft_;
  metering::Histogram& itl_;
  metering::Histogram& queue_;
  metering::Counter& prefix_queries_;
  metering::Counter& prefix_hits_;

  // The engine keeps totals; the counter follows them.
  static void catch_up(metering::Counter& c, std::int64_t total) {
    auto seen = static_cast<double>(total);
    if (seen > c.value()) c.inc(seen - c.value());
  }
};

class LocalHandle final : public CompletionHandle {
 public:
  LocalHandle(le::Engine& engine, std::uint64_t id, std::shared_ptr<std::atomic<bool>> cancelled)
      : engine_(engine), id_(id), cancelled_(std::move(cancelled)) {}
  void cancel() override {
    if (cancelled_->exchange(true) || id_ == 0) return;
    engine_.cancel(id_);
  }

 private:
  le::Engine& engine_;
  std::uint64_t id_;
  std::shared_ptr<std::atomic<bool>> cancelled_;
};

LogprobToken logprob_token(const le::Tokenizer& tokenizer, const le::TokenCandidate& c) {
  auto bytes = tokenizer.token_bytes(c.id);
  return {le::valid_utf8(bytes), std::move(bytes), c.logprob};
}

TokenLogprob token_logprob(const le::Tokenizer& tokenizer, const le::TokenLogprobs& lp) {
  TokenLogprob out{logprob_token(tokenizer, lp.chosen), {}};
  out.top.reserve(lp.top.size());
  for (const auto& c : lp.top) out.top.push_back(logprob_token(tokenizer, c));
  return out;
}

CompletionEvent error_event(ErrorKind kind, std::string message, Usage usage = {}) {
  CompletionEvent e;
  e.type = CompletionEvent::Type::error;
  e.error.kind = kind;
  e.error.message = std::move(message);
  if (kind == ErrorKind::overloaded) e.error.retry_after_s = 1;
  e.usage = usage;
  return e;
}

class LocalBackend final : public Backend {
 public:
  explicit LocalBackend(const LocalBackendConfig& config) : name_(config.name) {
    std::string why;
    std::unique_ptr<le::Device> device;
    try {
      device = le::make_device(config.device, config.engine.threads, why);
    } catch (const std::exception& e) {
      throw std::invalid_argument("backend '" + config.name + "': " + e.what());
    }
    std::fprintf(stderr, "tollgate: backend '%s': %s\n", config.name.c_str(), why.c_str());
    auto model = le::load_model(config.model_path, config.tokenizer_path);
    if (config.metrics) {
      metrics_ = std::make_unique<EngineMetrics>(*config.metrics, config.name);
      // Which device runs the backend, as an info metric (value 1).
      config.metrics
          ->gauge("tollgate_engine_device_info", "The device the local engine runs on (always 1).",
                  {"backend", "device"})
          .labels({config.name, device->name()})
          .set(1);
    }
    engine_ = std::make_unique<le::Engine>(std::move(model), config.engine, std::move(device), metrics_.get());
    chat_format_ = le::detect_chat_format(engine_->model().vocab.chat_template);
  }

  const std::string& name() const override { return name_; }
  std::string type() const override { return "local"; }
  Capabilities capabilities() const override { return {}; }

  std::int64_t prepare(CompletionRequest& request) const override {
    auto prepared = std::make_shared<PreparedPrompt>();
    prepared->backend = this;
    prepared->tokens = prompt_ids(request);
    prepared->count = static_cast<std::int64_t>(prepared->tokens.size());
    request.prepared = prepared;
    return prepared->count;
  }
  bool costly_prepare() const override { return true; }

  // What this engine cannot honour, said rather than ignored: a client that
  // needs a tool call or JSON must not get free text as if it had asked for it.
  std::optional<std::string> unsupported(const CompletionRequest& request) const {
    if (request.non_text_content) return "takes text only; its messages have other content parts";
    if (request.tools) return "cannot call tools (send tool_choice \"none\" or no tools)";
    if (!request.response_format.empty()) {
      return "cannot constrain its output to " + request.response_format + " (response_format)";
    }
    if (request.echo) return "does not echo the prompt (echo)";
    if (request.suffix) return "does not complete before a suffix (suffix)";
    const auto vocab = engine_->model().params.vocab_size;
    for (const auto& [token, bias] : request.logit_bias) {
      if (token >= vocab) {
        return "has no token " + std::to_string(token) + " in logit_bias (its vocabulary has " + std::to_string(vocab) +
               ")";
      }
    }
    return std::nullopt;
  }

  std::unique_ptr<CompletionHandle> start(CompletionRequest request, std::shared_ptr<CompletionSink> sink) override {
    auto cancelled = std::make_shared<std::atomic<bool>>(false);
    if (auto why = unsupported(request)) {
      sink->on_event(error_event(ErrorKind::bad_request, "the model '" + request.model + "' " + *why));
      return std::make_unique<LocalHandle>(*engine_, 0, std::move(cancelled));
    }
    le::GenerationRequest g;
    // Tokenised once: by prepare(), unless another backend prepared this request.
    if (request.prepared && request.prepared->backend == this) {
      g.prompt = request.prepared->tokens;
    } else {
      g.prompt = prompt_ids(request);
    }
    g.sampling.temperature = static_cast<float>(request.temperature);
    g.sampling.top_p = static_cast<float>(request.top_p);
    g.sampling.top_k = static_cast<std::int32_t>(request.top_k);
    g.sampling.min_p = static_cast<float>(request.min_p);
    g.sampling.presence_penalty = static_cast<float>(request.presence_penalty);
    g.sampling.frequency_penalty = static_cast<float>(request.frequency_penalty);
    g.sampling.repetition_penalty = static_cast<float>(request.repetition_penalty);
    g.sampling.seed = request.seed ? *request.seed : std::random_device{}();
    g.sampling.logit_bias = request.logit_bias;
    g.max_tokens = request.max_tokens.value_or(0);
    g.stop = request.stop;
    g.logprobs = request.logprobs.value_or(-1);
    const auto prompt_tokens = static_cast<std::int64_t>(g.prompt.size());

    const le::Tokenizer& tokenizer = engine_->tokenizer();
    auto submission = engine_->submit(std::move(g), [sink, cancelled, &tokenizer](le::GenerationEvent e) {
      if (cancelled->load()) return;
      CompletionEvent out;
      out.usage = {e.prompt_tokens, e.completion_tokens, false};
      switch (e.type) {
        case le::GenerationEvent::Type::text:
          out.text = std::move(e.text);
          out.logprobs.reserve(e.logprobs.size());
          for (const auto& lp : e.logprobs) out.logprobs.push_back(token_logprob(tokenizer, lp));
          break;
        case le::GenerationEvent::Type::done:
          out.type = CompletionEvent::Type::done;
          out.usage.cached_tokens = e.cached_prompt_tokens;
          out.finish_reason = std::move(e.finish_reason);
          break;
        case le::GenerationEvent::Type::error:
          out = error_event(ErrorKind::internal, std::move(e.error), out.usage);
          break;
      }
      sink->on_event(std::move(out));
    });
    switch (submission.refusal) {
      case le::Engine::Refusal::none:
        break;
      case le::Engine::Refusal::overloaded:
        sink->on_event(error_event(ErrorKind::overloaded, submission.message, {prompt_tokens, 0, false}));
        break;
      case le::Engine::Refusal::too_long: {
        auto e = error_event(ErrorKind::bad_request, submission.message, {prompt_tokens, 0, false});
        e.error.code = "context_length_exceeded";  // OpenAI's code, which clients trim their history on
        e.error.param = request.chat() ? "messages" : "prompt";
        sink->on_event(std::move(e));
        break;
      }
      case le::Engine::Refusal::invalid:
        sink->on_event(error_event(ErrorKind::bad_request, submission.message, {prompt_tokens, 0, false}));
        break;
    }
    return std::make_unique<LocalHandle>(*engine_, submission.id, std::move(cancelled));
  }

 private:
  std::vector<std::int32_t> prompt_ids(const CompletionRequest& request) const {
    const auto& tokenizer = engine_->tokenizer();
    const auto& vocab = tokenizer.vocabulary();
    if (!request.chat()) return tokenizer.encode(request.prompt, vocab.add_bos);
    std::vector<le::ChatTurn> turns;
    turns.reserve(request.messages.size());
    for (const auto& m : request.messages) turns.push_back({m.role, m.content});
    const bool has_bos = vocab.bos >= 0 && static_cast<std::size_t>(vocab.bos) < vocab.pieces.size();
    const std::string bos_piece = has_bos ? vocab.pieces[static_cast<std::size_t>(vocab.bos)] : std::string();
    // A format that writes BOS itself (llama2's "<s>") must not get a second one.
    bool add_bos = vocab.add_bos && !le::chat_format_writes_bos(chat_format_);
    return tokenizer.encode(le::render_chat_segments(chat_format_, turns, bos_piece), add_bos);
  }

  std::string name_;
  std::unique_ptr<EngineMetrics> metrics_;
  std::unique_ptr<le::Engine> engine_;
  le::ChatFormat chat_format_ = le::ChatFormat::plain;
};

}  // namespace

std::unique_ptr<Backend> make_local_backend(const LocalBackendConfig& config) {
  return std::make_unique<LocalBackend>(config);
}

namespace {

std::unique_ptr<Backend> make_local(const LocalBackendConfig& config, const BackendContext& context) {
  auto c = config;
  c.metrics = &context.metrics;
  try {
    if (c.create_demo && !std::filesystem::exists(c.model_path)) {
      local_engine::write_demo_model(c.model_path);
      std::cout << "tollgate: wrote the random-weight demo model to " << c.model_path
                << " (it babbles; configure a real GGUF to serve a real model)" << std::endl;
    }
    return make_local_backend(c);
  } catch (const std::exception& e) {
    throw ConfigError("backend '" + c.name + "': " + e.what());
  }
}

std::shared_ptr<const BackendSpec> parse_local(const ConfigReader& r, const YAML::Node& node, const std::string& path,
                                               const std::string& name) {
  r.expect_map(node, path,
               {"name", "type", "path", "tokenizer", "create_demo", "device", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "kv_cache", "block_size", "max_waiting", "threads", "prefix_caching"});
  LocalBackendConfig c;
  c.name = name;
  if (!node["path"]) r.fail(path, "missing key 'path' (the model file)");
  c.model_path = r.string(node["path"], child_path(path, "path"));
  if (auto n = node["tokenizer"]) c.tokenizer_path = r.string(n, child_path(path, "tokenizer"));
  if (auto n = node["create_demo"]) c.create_demo = r.boolean(n, child_path(path, "create_demo"));
  if (auto n = node["prefix_caching"]) c.engine.prefix_caching = r.boolean(n, child_path(path, "prefix_caching"));
  if (auto n = node["device"]) {
    c.device = r.string(n, child_path(path, "device"));
    if (c.device != "auto" && c.device != "cpu" && c.device != "cuda" && c.device != "cuda-emulated") {
      r.fail(child_path(path, "device"), "expected auto, cpu, cuda or cuda-emulated, got '" + c.device + "'");
    }
  }
  std::pair<const char*, std::int64_t*> counts[] = {{"max_num_seqs", &c.engine.max_num_seqs},
                                                    {"max_num_batched_tokens", &c.engine.max_num_batched_tokens},
                                                    {"block_size", &c.engine.block_size},
                                                    {"max_waiting", &c.engine.max_waiting}};
  for (auto [key, target] : counts) {
    if (auto n = node[key]) *target = r.integer(n, child_path(path, key), 1, 1'000'000);
  }
  // 0, the default, means the model file's own context length.
  if (auto n = node["max_model_len"]) {
    c.engine.max_model_len = r.integer(n, child_path(path, "max_model_len"), 0, 1'000'000);
  }
  if (auto n = node["kv_cache"]) {
    c.engine.kv_cache_bytes = static_cast<std::int64_t>(r.size(n, child_path(path, "kv_cache")));
  }
  if (auto n = node["threads"]) c.engine.threads = static_cast<int>(r.integer(n, child_path(path, "threads"), 0, 1024));
  return std::make_shared<BackendSpecOf<LocalBackendConfig>>(std::move(c), make_local);
}

}  // namespace

BackendType local_backend_type() { return {"local", parse_local}; }

}  // namespace tollgate::backends
