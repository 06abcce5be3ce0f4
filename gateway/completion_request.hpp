// Parses and validates an OpenAI completion request body (pure, no I/O).
#pragma once

#include <cstddef>
#include <string_view>
#include <variant>

#include "backends/backend.hpp"
#include "gateway/http_error.hpp"

namespace tollgate::gateway {

// No served model has a longer name; a longer `model` is refused, not looked up.
constexpr std::size_t kMaxModelName = 256;

struct ParsedCompletion {
  backends::CompletionRequest request;
  bool include_usage = false;  // stream_options.include_usage
};

// `chat` selects /v1/chat/completions rules (messages) over /v1/completions (prompt).
// Errors are 400s naming the offending parameter.
std::variant<ParsedCompletion, ApiError> parse_completion_request(std::string_view body, bool chat);

// An OpenAI /v1/embeddings body: `model` and `input` (a string, an array of
// strings, or token arrays) are checked; the body itself is forwarded.
std::variant<ParsedCompletion, ApiError> parse_embeddings_request(std::string_view body);

}  // namespace tollgate::gateway
