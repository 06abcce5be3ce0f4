// Builds OpenAI response bodies and server-sent events from backend events
// (pure, no I/O), so every backend gets both wire formats.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "backends/backend.hpp"
#include "gateway/http_error.hpp"

namespace tollgate::gateway {

class CompletionFormatter {
 public:
  // `chat` selects chat.completion(.chunk) over text_completion objects;
  // with `logprobs`, choices carry the tokens' log-probabilities in the
  // endpoint's format (chat's "content" list, or the legacy parallel arrays).
  CompletionFormatter(bool chat, std::string model, bool include_usage, bool logprobs = false);

  const std::string& id() const { return id_; }

  // One SSE event ("data: {...}\n\n") per call. The first chat delta also
  // carries the assistant role.
  // `extra_json`: more fields for the delta (a backend's tool_calls, ...).
  std::string delta_event(std::string_view text, const std::vector<backends::TokenLogprob>& logprobs = {},
                          std::string_view extra_json = {});
  std::string finish_event(std::string_view finish_reason);
  std::string usage_event(const backends::Usage& usage) const;  // choices: [], only with include_usage
  std::string error_event(const ApiError& error) const;
  static std::string done_event() { return "data: [DONE]\n\n"; }

  // The whole non-streaming response.
  std::string full_response(std::string_view text, std::string_view finish_reason, const backends::Usage& usage,
                            const std::vector<backends::TokenLogprob>& logprobs = {}, std::string_view extra_json = {});

 private:
  std::string chunk(std::string_view text, const char* finish_reason, bool with_role,
                    const std::vector<backends::TokenLogprob>* logprobs, std::string_view extra_json);

  bool chat_;
  std::string model_;
  bool include_usage_;
  bool logprobs_;
  std::int64_t text_offset_ = 0;  // legacy logprobs: code points of the tokens so far
  std::string id_;
  std::int64_t created_;
  bool sent_role_ = false;
};

}  // namespace tollgate::gateway
