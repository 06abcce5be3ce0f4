// Parses and validates an OpenAI completion request body (pure, no I/O).
#pragma once

#include <string_view>
#include <variant>

#include "backends/backend.hpp"
#include "gateway/http_error.hpp"

namespace tollgate::gateway {

struct ParsedCompletion {
  backends::CompletionRequest request;
  bool include_usage = false;  // stream_options.include_usage
};

// `chat` selects /v1/chat/completions rules (messages) over /v1/completions (prompt).
// Errors are 400s naming the offending parameter.
std::variant<ParsedCompletion, ApiError> parse_completion_request(std::string_view body, bool chat);

}  // namespace tollgate::gateway
