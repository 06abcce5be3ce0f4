#include "backends/echo.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <mutex>
#include <queue>
#include <thread>

#include "backends/config_reader.hpp"

namespace tollgate::backends {
namespace {

using Clock = std::chrono::steady_clock;

// One echo reply: the tokens to send and how far it got.
struct Reply {
  std::vector<std::string> tokens;
  std::size_t next = 0;
  std::string finish_reason;
  std::optional<std::int32_t> logprobs;  // as asked for
  Usage usage;
  std::shared_ptr<CompletionSink> sink;
  std::atomic<bool> cancelled{false};

  // Sends the next token, or the final event; returns false when finished.
  bool step() {
    if (cancelled.load()) return false;
    if (next < tokens.size()) {
      ++usage.completion_tokens;
      CompletionEvent delta;
      delta.text = tokens[next++];
      if (logprobs) {
        // An echo is certain of every word: probability 1, and nothing else possible.
        LogprobToken certain{delta.text, delta.text, 0.0};
        delta.logprobs.push_back({certain, {}});
        if (*logprobs > 0) delta.logprobs.back().top.push_back(std::move(certain));
      }
      sink->on_event(std::move(delta));
      return true;
    }
    CompletionEvent done;
    done.type = CompletionEvent::Type::done;
    done.finish_reason = finish_reason;
    done.usage = usage;
    sink->on_event(std::move(done));
    return false;
  }
};

class ReplyHandle final : public CompletionHandle {
 public:
  explicit ReplyHandle(std::shared_ptr<Reply> reply) : reply_(std::move(reply)) {}
  void cancel() override { reply_->cancelled = true; }

 private:
  std::shared_ptr<Reply> reply_;
};

// Paces delayed replies from one thread: a queue of (due time, reply).
class Pacer {
 public:
  explicit Pacer(std::chrono::milliseconds delay) : delay_(delay), thread_([this] { run(); }) {}
  ~Pacer() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

  void add(std::shared_ptr<Reply> reply) {
    {
      std::lock_guard lock(mutex_);
      due_.push({Clock::now() + delay_, std::move(reply)});
    }
    wake_.notify_one();
  }

 private:
  struct Due {
    Clock::time_point at;
    std::shared_ptr<Reply> reply;
    bool operator>(const Due& other) const { return at > other.at; }
  };

  void run() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      if (due_.empty()) {
        wake_.wait(lock);
        continue;
      }
      // A copy: the wait lets go of the lock, and an add() meanwhile may move the queue's storage.
      const Clock::time_point next = due_.top().at;
      if (next > Clock::now()) {
        wake_.wait_until(lock, next);
        continue;
      }
      Due item = due_.top();
      due_.pop();
      lock.unlock();
      bool more = item.reply->step();
      lock.lock();
      if (more) due_.push({item.at + delay_, std::move(item.reply)});
    }
  }

  std::chrono::milliseconds delay_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::priority_queue<Due, std::vector<Due>, std::greater<>> due_;
  bool stopping_ = false;
  std::thread thread_;
};

std::string reply_source(const CompletionRequest& request) {
  if (!request.chat()) return request.prompt;
  for (auto it = request.messages.rbegin(); it != request.messages.rend(); ++it) {
    if (it->role == "user") return it->content;
  }
  return request.messages.empty() ? std::string() : request.messages.back().content;
}

class EchoBackend final : public Backend {
 public:
  explicit EchoBackend(const EchoConfig& config) : config_(config) {
    if (config_.token_delay.count() > 0) pacer_ = std::make_unique<Pacer>(config_.token_delay);
  }

  const std::string& name() const override { return config_.name; }
  std::string type() const override { return "echo"; }
  Capabilities capabilities() const override { return {}; }

  static std::int64_t count_prompt(const CompletionRequest& request) {
    if (!request.chat()) return static_cast<std::int64_t>(echo_tokens(request.prompt).size());
    std::int64_t n = 0;
    for (const auto& m : request.messages) n += static_cast<std::int64_t>(echo_tokens(m.content).size());
    return n;
  }

  std::int64_t prepare(CompletionRequest& request) const override {
    auto prepared = std::make_shared<PreparedPrompt>();
    prepared->backend = this;
    prepared->count = count_prompt(request);
    request.prepared = prepared;
    return prepared->count;
  }

  std::unique_ptr<CompletionHandle> start(CompletionRequest request, std::shared_ptr<CompletionSink> sink) override {
    auto reply = std::make_shared<Reply>();
    reply->sink = std::move(sink);
    reply->usage.prompt_tokens =
        request.prepared && request.prepared->backend == this ? request.prepared->count : count_prompt(request);
    reply->tokens = echo_tokens(reply_source(request));
    reply->finish_reason = "stop";
    reply->logprobs = request.logprobs;
    truncate_at_stop(*reply, request.stop);
    if (request.max_tokens && static_cast<std::int64_t>(reply->tokens.size()) > *request.max_tokens) {
      reply->tokens.resize(static_cast<std::size_t>(*request.max_tokens));
      reply->finish_reason = "length";
    }
    if (pacer_) {
      pacer_->add(reply);
    } else {
      while (reply->step()) {
      }
    }
    return std::make_unique<ReplyHandle>(std::move(reply));
  }

 private:
  // Cuts the reply before the earliest stop sequence, as a model's output would be.
  static void truncate_at_stop(Reply& reply, const std::vector<std::string>& stops) {
    std::string text;
    for (const auto& token : reply.tokens) text += token;
    std::size_t cut = std::string::npos;
    for (const auto& stop : stops) cut = std::min(cut, text.find(stop));
    if (cut == std::string::npos) return;
    std::vector<std::string> kept;
    std::size_t pos = 0;
    for (const auto& token : reply.tokens) {
      if (pos + token.size() > cut) {
        if (cut > pos) kept.push_back(token.substr(0, cut - pos));
        break;
      }
      kept.push_back(token);
      pos += token.size();
    }
    reply.tokens = std::move(kept);
  }

  EchoConfig config_;
  std::unique_ptr<Pacer> pacer_;
};

}  // namespace

std::vector<std::string> echo_tokens(const std::string& text) {
  // Each token is a word with the whitespace before it, so tokens concatenate
  // back to the text.
  std::vector<std::string> tokens;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t start = i;
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    while (i < text.size() && !std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    tokens.push_back(text.substr(start, i - start));
  }
  return tokens;
}

std::unique_ptr<Backend> make_echo_backend(const EchoConfig& config) { return std::make_unique<EchoBackend>(config); }

namespace {

std::unique_ptr<Backend> make_echo(const EchoConfig& config, const BackendContext&) {
  return make_echo_backend(config);
}

std::shared_ptr<const BackendSpec> parse_echo(const ConfigReader& r, const YAML::Node& node, const std::string& path,
                                              const std::string& name) {
  r.expect_map(node, path, {"name", "type", "token_delay"});
  EchoConfig c;
  c.name = name;
  if (auto n = node["token_delay"]) c.token_delay = r.duration(n, child_path(path, "token_delay"));
  return std::make_shared<BackendSpecOf<EchoConfig>>(std::move(c), make_echo);
}

}  // namespace

BackendType echo_backend_type() { return {"echo", parse_echo}; }

}  // namespace tollgate::backends
