// OpenAI-style errors: {"error":{"message","type","param","code"}} with a status.
#pragma once

#include <optional>
#include <string>

#include "backends/backend.hpp"

namespace tollgate::gateway {

struct ApiError {
  int status = 500;
  std::string message;
  std::string type;  // invalid_request_error, authentication_error, permission_error, ...
  std::optional<std::string> param;
  std::optional<std::string> code;
  std::optional<std::int64_t> retry_after_s;  // 429 and 503

  std::string body() const;  // the JSON object, no trailing newline
};

ApiError bad_request(std::string message, std::optional<std::string> param = std::nullopt,
                     std::string code = "invalid_value");
ApiError unauthorized(std::string message, std::string code = "invalid_api_key");
ApiError forbidden(std::string message, std::string code = "model_not_allowed");
ApiError not_found(std::string message, std::string code = "not_found");
ApiError rate_limited(std::string message, std::int64_t retry_after_s);
ApiError from_backend(const backends::BackendError& error);

}  // namespace tollgate::gateway
