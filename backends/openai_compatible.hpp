// A remote OpenAI-compatible API (Groq, OpenAI, vLLM, a llama.cpp server, or
// another Tollgate) as a Backend: the request is re-encoded for the upstream,
// its JSON or SSE answer is read incrementally into CompletionEvents, and
// usage is the upstream's own count whenever it reports one.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "backends/backend.hpp"
#include "backends/backend_factory.hpp"
#include "backends/sse_parser.hpp"

namespace tollgate::backends {

struct OpenAICompatibleConfig {
  std::string name;
  std::string base_url;  // http(s)://host[:port]/path, e.g. https://api.groq.com/openai/v1
  std::string api_key;   // sent as a bearer token; never logged, never returned
  std::vector<std::pair<std::string, std::string>> headers;  // added to every upstream request
  std::chrono::milliseconds connect_timeout{10'000};         // DNS, TCP and TLS
  std::chrono::milliseconds first_byte_timeout{60'000};      // request sent to response headers
  std::chrono::milliseconds idle_timeout{60'000};            // between two reads of the body
  std::chrono::milliseconds total_timeout{600'000};          // the whole call
  std::size_t max_connections = 64;
  std::string ca_file;
  bool insecure_skip_verify = false;
  // A GGUF or llama2.c tokenizer file for the upstream's model: when the
  // upstream reports no usage, tokens are counted with it (still marked
  // estimated) instead of guessed from bytes and chunks.
  std::string tokenizer_path;
  // Events the client has not taken yet past which reading the upstream pauses.
  std::size_t max_pending_events = 64;
};

// Throws std::invalid_argument for a bad base_url, an unreadable ca_file or tokenizer.
std::unique_ptr<Backend> make_openai_compatible_backend(const OpenAICompatibleConfig& config);

// `type: openai`: reads base_url, api_key, headers, timeouts, max_connections,
// ca_file, insecure_skip_verify and tokenizer into an OpenAICompatibleConfig.
BackendType openai_backend_type();

// The upstream request body: the model is the deployment's, and a streamed
// call always asks for usage so metering is exact.
std::string upstream_request_body(const CompletionRequest& request);

// A prompt's tokens guessed without the upstream's tokenizer: ~4 bytes per
// token, and a few per chat message for the upstream's template (at least 1).
std::int64_t estimate_prompt_tokens(const CompletionRequest& request);

// Caps on what is read from an upstream, so that a broken or hostile one costs
// bounded memory. A streamed chunk is small, but one holding a whole image, a
// long tool call or many logprobs can reach megabytes.
inline constexpr std::size_t kMaxCompletionBody = 16 * 1024 * 1024;  // a whole non-streamed completion
inline constexpr std::size_t kMaxEmbeddingsBody = 64 * 1024 * 1024;  // 2048 inputs of 1536 floats as JSON fit
inline constexpr std::size_t kMaxUpstreamMessage = 1024;             // upstream words quoted in an error

// Removes the backend's credentials from upstream text before it is relayed in
// an error or logged: the api_key and every configured header value (from 8
// bytes: shorter ones are flags or versions, and scrubbing them would mangle
// the message), raw and as they read inside a JSON string or a URL; an echo
// of a secret's first 12 or more bytes (a truncated quote); and any bearer
// token. Each becomes "***".
class SecretScrubber {
 public:
  SecretScrubber() = default;
  SecretScrubber(const std::string& api_key, const std::vector<std::pair<std::string, std::string>>& headers);
  std::string operator()(std::string text) const;

 private:
  void add(const std::string& secret);
  std::vector<std::string> forms_;    // every spelling of every secret, longest first
  std::vector<std::string> secrets_;  // as configured, for truncated echoes
};

// Upstream words quoted in an error: scrubbed, then cut to kMaxUpstreamMessage
// bytes (scrubbed first, so no piece of a secret survives the cut).
std::string quote_upstream(std::string text, const SecretScrubber& scrub);

// A non-2xx upstream answer as the error a client sees: 429 rate_limited (with
// its Retry-After seconds), 401/403 upstream_failed without the upstream's
// words, 404 not_found, 408 timeout, 400/413/422 bad_request, the rest
// upstream_failed; the message quotes an OpenAI-style error body's message.
BackendError upstream_status_error(int status, const std::string& body, std::string_view retry_after,
                                   const SecretScrubber& scrub);

}  // namespace tollgate::backends
