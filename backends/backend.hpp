// The one seam between the gateway and whatever produces completions: a
// Backend takes a validated request and delivers a stream of events to a sink.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tollgate::backends {

class Backend;

// A prompt as one backend renders and tokenises it: done once per request.
struct PreparedPrompt {
  const Backend* backend = nullptr;  // whose rendering this is
  std::vector<std::int32_t> tokens;  // the ids, where the backend runs them itself
  std::int64_t count = 0;            // the prompt's tokens (an estimate for a remote producer)
};

struct ChatMessage {
  std::string role;  // system | user | assistant | tool | developer
  std::string content;
};

// The OpenAI endpoint a request came to.
enum class Endpoint {
  completions,       // /v1/completions: `prompt`
  chat_completions,  // /v1/chat/completions: `messages`
  // /v1/embeddings: `body` is forwarded, `prompt` holds the input's text (for
  // estimates); served by Backend::embed.
  embeddings,
};

struct CompletionRequest {
  Endpoint endpoint = Endpoint::completions;
  bool chat() const { return endpoint == Endpoint::chat_completions; }
  bool embeddings() const { return endpoint == Endpoint::embeddings; }
  std::string model;           // the public name the client asked for
  std::string upstream_model;  // the deployment's name for it
  std::vector<ChatMessage> messages;
  std::string prompt;
  std::optional<std::int64_t> max_tokens;
  double temperature = 1.0;
  double top_p = 1.0;
  double presence_penalty = 0.0;
  double frequency_penalty = 0.0;
  // Beyond OpenAI's parameters, as vLLM and llama.cpp's server accept them.
  std::int64_t top_k = 0;  // 0: off
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  std::optional<std::uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  // Log-probabilities of the generated tokens, with this many most likely
  // alternatives at each position (0 to 20); unset: none.
  std::optional<std::int32_t> logprobs;
  // Content parts other than text (images, audio) were sent: only a remote
  // backend can take them, from `body`.
  bool non_text_content = false;
  // OpenAI's logit_bias: (token id, -100..100) added to that token's logit.
  std::vector<std::pair<std::int32_t, float>> logit_bias;
  // What only a backend that forwards `body` can honour; the local engine
  // refuses a request that asks for it rather than ignore it.
  bool tools = false;                 // tools offered, and tool_choice not "none"
  std::string response_format;        // its type when not "text": json_object, json_schema
  bool echo = false, suffix = false;  // text completions: echo the prompt, insert before a suffix
  // The client's request body as it came: a remote OpenAI-compatible backend
  // forwards it (tools, response_format, images, ...), the model mapped.
  std::string body;
  std::string user;  // the authenticated Tollgate user
  // Set by Backend::prepare; a backend other than `prepared->backend` ignores it.
  std::shared_ptr<const PreparedPrompt> prepared;
};

struct LogprobToken {
  std::string text;   // valid UTF-8: a token that is part of a character shows U+FFFD
  std::string bytes;  // exactly what the token stands for
  double logprob = 0;
};

// A generated token's log-probability and the most likely tokens at its
// position (most likely first; the chosen one may be among them).
struct TokenLogprob {
  LogprobToken chosen;
  std::vector<LogprobToken> top;
};

struct Usage {
  Usage() = default;
  Usage(std::int64_t prompt, std::int64_t completion, bool is_estimated = false)
      : prompt_tokens(prompt), completion_tokens(completion), estimated(is_estimated) {}

  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  bool estimated = false;  // counted by us, not reported by the producer
  // Where the producer says: prompt tokens served from its prefix cache, and
  // completion tokens spent reasoning (OpenAI's usage details).
  std::optional<std::int64_t> cached_tokens;
  std::optional<std::int64_t> reasoning_tokens;
};

// HTTP-meaningful failure kinds; the gateway maps them to status codes.
enum class ErrorKind { bad_request, not_found, overloaded, upstream_failed, timeout, rate_limited, internal };

struct BackendError {
  BackendError() = default;
  BackendError(ErrorKind k, std::string m, std::optional<std::int64_t> retry = std::nullopt)
      : kind(k), message(std::move(m)), retry_after_s(retry) {}
  ErrorKind kind = ErrorKind::internal;
  std::string message;
  std::optional<std::int64_t> retry_after_s;
  // A bad request's OpenAI code and param when the backend knows them (e.g.
  // context_length_exceeded, which clients act on); empty: the generic ones.
  std::string code;
  std::optional<std::string> param;
};

// Text deltas, then exactly one `done` or `error`. Usage rides on both final
// events (for an error: what was produced before it).
struct CompletionEvent {
  enum class Type { delta, done, error };
  Type type = Type::delta;
  std::string text;                    // delta
  std::vector<TokenLogprob> logprobs;  // delta, when asked for: the tokens behind `text`
  // delta: what else an upstream's delta (or message) held besides role and
  // content, as a JSON object (tool_calls, refusal, ...), or empty.
  std::string extra_json;
  std::string finish_reason;  // done: "stop" or "length"
  std::string body;           // done, from Backend::embed: the whole answer, OpenAI's JSON
  Usage usage;                // done, error; on a delta, a running count when the producer keeps one (local)
  BackendError error;         // error
};

// Receives a request's events, possibly from another thread, in order; nothing
// arrives after the final event.
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  virtual void on_event(CompletionEvent event) = 0;
  // Backpressure for a producer that can wait (a remote upstream), so a slow
  // client cannot make the gateway buffer without bound. When more than
  // `limit` delivered events wait for the consumer, keeps `wake` and returns
  // true: the producer pauses, and `wake` is called once, on the consumer's
  // thread, when at most `limit` wait again; it must only hand off to the
  // producer's own executor. Otherwise returns false and keeps nothing. The
  // check and the keeping are one step, so no wake-up falls between them; a
  // later call replaces the kept `wake`.
  virtual bool when_drained(std::size_t /*limit*/, std::function<void()> /*wake*/) { return false; }
};

// Stops a running request; the backend then sends no further events. Safe to
// call from any thread, at any time, more than once.
class CompletionHandle {
 public:
  virtual ~CompletionHandle() = default;
  virtual void cancel() = 0;
};

struct Capabilities {
  bool chat = true;
  bool completions = true;
  bool streaming = true;
  bool embeddings = false;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const std::string& name() const = 0;
  virtual std::string type() const = 0;  // config type: "echo", "openai", "local"
  virtual Capabilities capabilities() const = 0;

  // Renders and tokenises the request's prompt as this backend will run it,
  // sets request.prepared so start() need not do it again, and returns the
  // prompt's tokens (for the quota's reservation before the call). Where
  // costly_prepare() says so, the gateway calls it off its io threads.
  virtual std::int64_t prepare(CompletionRequest& request) const = 0;
  virtual bool costly_prepare() const { return false; }

  // Starts a completion; the sink may be called before start() returns.
  virtual std::unique_ptr<CompletionHandle> start(CompletionRequest request, std::shared_ptr<CompletionSink> sink) = 0;

  // Starts an embeddings request (where capabilities().embeddings): one `done`
  // event whose `body` is the answer, or an `error`.
  virtual std::unique_ptr<CompletionHandle> embed(CompletionRequest request, std::shared_ptr<CompletionSink> sink);
};

inline std::unique_ptr<CompletionHandle> Backend::embed(CompletionRequest request,
                                                        std::shared_ptr<CompletionSink> sink) {
  struct Finished final : CompletionHandle {
    void cancel() override {}
  };
  CompletionEvent refused;
  refused.type = CompletionEvent::Type::error;
  refused.error = {ErrorKind::bad_request, "the model '" + request.model + "' does not serve embeddings", {}};
  sink->on_event(std::move(refused));
  return std::make_unique<Finished>();
}

}  // namespace tollgate::backends
