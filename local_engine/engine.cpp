#include "local_engine/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <utility>

#include "local_engine/forward.hpp"
#include "local_engine/kv_cache.hpp"
#include "local_engine/scheduler.hpp"

namespace tollgate::local_engine {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

GenerationEvent error_event(std::string message, std::int64_t prompt_tokens, std::int64_t completion_tokens) {
  GenerationEvent e;
  e.type = GenerationEvent::Type::error;
  e.error = std::move(message);
  e.prompt_tokens = prompt_tokens;
  e.completion_tokens = completion_tokens;
  return e;
}

// Files often claim 128K positions; the default stays where one sequence's
// KV cache is a few hundred MB at most. max_model_len raises it.
constexpr std::int64_t kDefaultMaxModelLen = 8192;

std::int64_t resolved_max_model_len(const Model& model, const EngineConfig& config) {
  if (config.max_model_len > 0) return config.max_model_len;
  return model.params.context_length > 0 ? std::min(model.params.context_length, kDefaultMaxModelLen) : 2048;
}

std::int64_t resolved_kv_blocks(const Model& model, const EngineConfig& config, std::int64_t max_model_len) {
  const auto& p = model.params;
  const auto per_block = KvCache::block_bytes(p.n_layers, config.block_size, p.n_kv_heads * p.head_dim());
  const auto one_sequence = (max_model_len + config.block_size - 1) / config.block_size;
  if (config.kv_cache_bytes > 0) {
    auto blocks = config.kv_cache_bytes / per_block;
    if (blocks < one_sequence) {
      throw ModelError("kv_cache of " + std::to_string(config.kv_cache_bytes) + " bytes holds " +
                       std::to_string(blocks * config.block_size) +
                       " tokens, less than one sequence of max_model_len " + std::to_string(max_model_len));
    }
    return blocks;
  }
  // Room for every sequence at full length, but no more than 1 GiB unless one sequence needs it.
  constexpr std::int64_t kDefaultCap = std::int64_t{1} << 30;
  return std::max(one_sequence, std::min(one_sequence * config.max_num_seqs, kDefaultCap / per_block));
}

}  // namespace

// A request inside the engine: the scheduler's view plus what turns its
// tokens into text for the caller.
struct Engine::Live : ScheduledRequest {
  Live(const Tokenizer& tokenizer, GenerationRequest&& r, GenerationCallback&& cb)
      : sampler(r.sampling, r.prompt),
        text(tokenizer, r.prompt.size() == 1 && r.prompt[0] == tokenizer.vocabulary().bos),
        stop(std::move(r.stop)),
        max_tokens(r.max_tokens),
        logprobs(r.logprobs),
        num_prompt(static_cast<std::int64_t>(r.prompt.size())),
        callback(std::move(cb)) {
    tokens = std::move(r.prompt);
  }

  Sampler sampler;
  TextStream text;
  StopMatcher stop;
  std::int64_t max_tokens;
  std::int32_t logprobs;              // alternatives wanted per token; -1: none
  std::vector<float> raw_logits;      // with logprobs: this step's logits, before the sampler's changes
  std::vector<TokenLogprobs> unsent;  // with logprobs: tokens whose text is still held back
  std::int64_t num_prompt;
  GenerationCallback callback;
  Clock::time_point submitted = Clock::now();
  Clock::time_point last_token;
  bool scheduled = false;

  std::int64_t generated() const { return num_tokens() - num_prompt; }
  void send_text(std::string text) {
    if (text.empty()) return;
    GenerationEvent e;
    e.text = std::move(text);
    e.logprobs = std::exchange(unsent, {});
    // The running count: a request cut short is metered with what it produced.
    e.prompt_tokens = num_prompt;
    e.completion_tokens = generated();
    callback(std::move(e));
  }
};

struct Engine::State {
  State(const Model& model, const EngineConfig& config, Device& device, std::int64_t max_len, std::int64_t blocks)
      : max_model_len(max_len),
        allocator(blocks, config.block_size, config.prefix_caching),
        cache(model.params.n_layers, blocks, config.block_size, model.params.n_kv_heads * model.params.head_dim(),
              [&device](std::size_t bytes) { return device.allocate(bytes); }),
        scheduler({config.max_num_seqs, config.max_num_batched_tokens}, allocator),
        forward(model, device, cache, std::max(config.max_num_batched_tokens, config.max_num_seqs)) {
    batch.reserve(static_cast<std::size_t>(config.max_num_batched_tokens));
  }

  std::int64_t max_model_len;
  KvBlockAllocator allocator;
  KvCache cache;
  Scheduler scheduler;
  ForwardPass forward;
  std::map<std::uint64_t, std::unique_ptr<Live>> live;
  std::vector<BatchToken> batch;
};

namespace {

std::string gib(std::size_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return text;
}

// A model the device cannot hold is refused before anything is uploaded.
void check_fits(const Model& model, const EngineConfig& config, Device& device) {
  const auto free = device.free_memory();
  if (!free) return;
  const auto& p = model.params;
  const auto weights = ForwardPass::weight_bytes(model);
  const auto kv = static_cast<std::size_t>(config.kv_cache_bytes);
  const auto tokens = static_cast<std::size_t>(std::max(config.max_num_batched_tokens, config.max_num_seqs));
  const auto activations =
      tokens * sizeof(float) *
      static_cast<std::size_t>(5 * p.dim + 2 * p.n_kv_heads * p.head_dim() + 2 * p.hidden_dim + p.vocab_size);
  if (weights + kv + activations > *free) {
    throw ModelError(model.name + " does not fit on " + device.name() + ": weights " + gib(weights) + ", KV cache " +
                     gib(kv) + ", activations " + gib(activations) + "; " + gib(*free) +
                     " free (lower kv_cache_bytes, max_model_len or max_num_seqs, or use a smaller model)");
  }
}

}  // namespace

Engine::Engine(Model model, EngineConfig config, std::unique_ptr<Device> device, EngineObserver* observer)
    : model_(std::move(model)),
      tokenizer_(model_.vocab),
      config_(config),
      device_(std::move(device)),
      observer_(observer) {
  const auto& p = model_.params;
  for (const auto* t : {&model_.token_embedding, &model_.output}) {
    if (!device_->supports(t->type)) {
      throw ModelError("device " + device_->name() + " cannot run " + std::string(dtype_name(t->type)) + " weights");
    }
  }
  if (config_.max_num_seqs < 1 || config_.max_num_batched_tokens < 1 || config_.block_size < 1) {
    throw ModelError("max_num_seqs, max_num_batched_tokens and block_size must be positive");
  }
  const auto max_len = resolved_max_model_len(model_, config_);
  config_.max_model_len = max_len;
  if (p.context_length > 0 && max_len > p.context_length) {
    std::fprintf(stderr, "tollgate: warning: max_model_len %lld exceeds %s's context length %lld\n",
                 static_cast<long long>(max_len), model_.name.c_str(), static_cast<long long>(p.context_length));
  }
  const auto blocks = resolved_kv_blocks(model_, config_, max_len);
  config_.kv_cache_bytes = blocks * KvCache::block_bytes(p.n_layers, config_.block_size, p.n_kv_heads * p.head_dim());
  check_fits(model_, config_, *device_);
  state_ = std::make_unique<State>(model_, config_, *device_, max_len, blocks);
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

Engine::Submission Engine::submit(GenerationRequest request, GenerationCallback callback) {
  if (request.prompt.empty()) return {0, Refusal::invalid, "the prompt is empty"};
  auto len = static_cast<std::int64_t>(request.prompt.size());
  if (len >= config_.max_model_len) {
    return {0, Refusal::too_long,
            "the prompt has " + std::to_string(len) + " tokens; this model's maximum context length is " +
                std::to_string(config_.max_model_len) + " tokens"};
  }
  for (auto t : request.prompt) {
    if (t < 0 || t >= model_.params.vocab_size) return {0, Refusal::invalid, "token id out of range"};
  }
  auto live = std::make_unique<Live>(tokenizer_, std::move(request), std::move(callback));
  std::uint64_t id;
  {
    std::lock_guard lock(mutex_);
    // Not yet running: what the next step will start (free sequence slots)
    // does not count against the waiting room.
    const auto queued = static_cast<std::int64_t>(inbox_.size()) + waiting_.load();
    const auto free_slots = std::max<std::int64_t>(0, config_.max_num_seqs - running_.load());
    if (stopping_ || queued >= config_.max_waiting + free_slots) {
      return {0, Refusal::overloaded, "the local engine's queue is full; retry shortly"};
    }
    id = next_id_++;
    live->id = id;
    inbox_.push_back(std::move(live));
  }
  wake_.notify_one();
  return {id, Refusal::none, {}};
}

void Engine::cancel(std::uint64_t id) {
  {
    std::lock_guard lock(mutex_);
    cancels_.push_back(id);
  }
  wake_.notify_one();
}

EngineStats Engine::stats() const {
  return {running_.load(),     waiting_.load(),        kv_usage_.load(),
          preemptions_.load(), prefix_queries_.load(), prefix_hits_.load()};
}

void Engine::run() {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock,
                 [&] { return stopping_ || !inbox_.empty() || !cancels_.empty() || state_->scheduler.has_work(); });
      if (stopping_) break;
    }
    admit_and_cancel();
    try {
      step();
    } catch (const std::exception& e) {
      // A broken step fails what was in it, not the process.
      std::fprintf(stderr, "tollgate: engine step failed: %s\n", e.what());
      while (!state_->live.empty()) {
        auto& live = *state_->live.begin()->second;
        live.callback(error_event(std::string("engine failure: ") + e.what(), live.num_prompt, live.generated()));
        state_->scheduler.finish(&live);
        state_->live.erase(state_->live.begin());
      }
    }
    running_ = static_cast<std::int64_t>(state_->scheduler.num_running());
    waiting_ = static_cast<std::int64_t>(state_->scheduler.num_waiting());
    kv_usage_ = state_->allocator.usage();
    prefix_queries_ = state_->scheduler.prefix_queries();
    prefix_hits_ = state_->scheduler.prefix_hits();
    if (observer_) observer_->on_step(stats());
  }
  for (auto& [id, live] : state_->live) {
    live->callback(error_event("the engine is shutting down", live->num_prompt, live->generated()));
  }
  for (auto& live : inbox_) {
    live->callback(error_event("the engine is shutting down", live->num_prompt, 0));
  }
}

void Engine::admit_and_cancel() {
  std::vector<std::unique_ptr<Live>> admitted;
  std::vector<std::uint64_t> cancelled;
  {
    std::lock_guard lock(mutex_);
    admitted.swap(inbox_);
    cancelled.swap(cancels_);
    // Still waiting, until the step after which the exact count is known.
    waiting_ += static_cast<std::int64_t>(admitted.size());
  }
  for (auto& live : admitted) {
    state_->scheduler.add_request(live.get());
    state_->live.emplace(live->id, std::move(live));
  }
  for (auto id : cancelled) {
    auto it = state_->live.find(id);
    if (it == state_->live.end()) continue;  // already finished
    state_->scheduler.finish(it->second.get());
    state_->live.erase(it);
  }
}

void Engine::step() {
  auto& s = *state_;
  const SchedulerOutput& out = s.scheduler.schedule();
  preemptions_ += static_cast<std::int64_t>(out.preempted.size());
  if (out.empty()) return;

  s.batch.clear();
  auto now = Clock::now();
  for (const auto& c : out.chunks) {
    auto& live = static_cast<Live&>(*c.request);
    if (!live.scheduled) {
      live.scheduled = true;
      if (observer_) observer_->on_scheduled(seconds_between(live.submitted, now), live.num_prompt);
    }
    for (auto i = c.start; i < c.start + c.count; ++i) {
      s.batch.push_back(
          {live.tokens[static_cast<std::size_t>(i)], i, &live.blocks, c.samples && i == c.start + c.count - 1});
    }
  }
  // When every sampling sequence is plainly greedy and wants no logprobs,
  // the device picks the tokens and only their ids come back.
  bool ids_only = true;
  for (const auto& c : out.chunks) {
    const auto& live = static_cast<const Live&>(*c.request);
    if (c.samples && (live.logprobs >= 0 || !live.sampler.params().plain_greedy())) ids_only = false;
  }
  StepOutput result = s.forward.run(s.batch, ids_only);
  s.scheduler.update_from_output(out);

  const auto vocab = static_cast<std::int32_t>(model_.params.vocab_size);
  std::size_t row = 0;
  for (const auto& c : out.chunks) {
    if (!c.samples) continue;
    auto& live = static_cast<Live&>(*c.request);
    if (ids_only) {
      emit_token(live, result.ids[row++]);
      continue;
    }
    float* l = result.logits.data() + row++ * static_cast<std::size_t>(vocab);
    if (live.logprobs >= 0) live.raw_logits.assign(l, l + vocab);
    emit_token(live, live.sampler.sample(l, vocab));
  }
}

void Engine::emit_token(Live& live, std::int32_t token) {
  auto now = Clock::now();
  if (observer_) {
    if (live.generated() == 0) {
      observer_->on_first_token(seconds_between(live.submitted, now));
    } else {
      observer_->on_token(seconds_between(live.last_token, now));
    }
  }
  live.last_token = now;
  live.sampler.accept(token);
  live.tokens.push_back(token);
  // The token that ends generation is counted too, so it reports its logprobs as well.
  if (live.logprobs >= 0) {
    live.unsent.push_back(token_logprobs(live.raw_logits.data(), static_cast<std::int32_t>(live.raw_logits.size()),
                                         token, live.logprobs));
  }
  // A generated BOS starts a new document: the reference generator stops there too.
  if (tokenizer_.ends_generation(token) || token == model_.vocab.bos) {
    finish(live, "stop", /*flush_logprobs=*/true);
    return;
  }
  auto r = live.stop.push(live.text.push(token));
  live.send_text(std::move(r.text));
  if (r.stopped) {
    finish(live, "stop");
    return;
  }
  bool at_max = live.max_tokens > 0 && live.generated() >= live.max_tokens;
  if (at_max || live.num_tokens() >= state_->max_model_len) finish(live, "length");
}

void Engine::finish(Live& live, const std::string& reason, bool flush_logprobs) {
  std::string finish_reason = reason;
  // Flush what the text stream and the stop matcher still hold.
  auto tail = live.stop.push(live.text.finish());
  live.send_text(std::move(tail.text));
  if (tail.stopped) {
    finish_reason = "stop";
  } else {
    live.send_text(live.stop.finish());
  }
  // The token that ended generation has no text: its logprobs go on their own.
  // (Tokens a stop string swallowed report nothing, as their text is not sent.)
  if (flush_logprobs && !live.unsent.empty()) {
    GenerationEvent rest;
    rest.logprobs = std::exchange(live.unsent, {});
    live.callback(std::move(rest));
  }
  GenerationEvent done;
  done.type = GenerationEvent::Type::done;
  done.finish_reason = finish_reason;
  done.prompt_tokens = live.num_prompt;
  done.completion_tokens = live.generated();
  done.cached_prompt_tokens = live.num_cached_prompt;
  done.tokens.assign(live.tokens.begin() + live.num_prompt, live.tokens.end());
  live.callback(std::move(done));
  state_->scheduler.finish(&live);
  state_->live.erase(live.id);
}

}  // namespace tollgate::local_engine
