// A remote OpenAI-compatible API (Groq, OpenAI, vLLM, a llama.cpp server, or
// another Tollgate) as a Backend: the request is re-encoded for the upstream,
// its JSON or SSE answer is read incrementally into CompletionEvents, and
// usage is the upstream's own count whenever it reports one.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "backends/backend.hpp"
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

// The upstream request body: the model is the deployment's, and a streamed
// call always asks for usage so metering is exact.
std::string upstream_request_body(const CompletionRequest& request);

}  // namespace tollgate::backends
