#include "gateway/http_error.hpp"

#include <boost/json.hpp>

namespace tollgate::gateway {

std::string ApiError::body() const {
  namespace json = boost::json;
  json::object error{{"message", message}, {"type", type}};
  error["param"] = param ? json::value(*param) : json::value(nullptr);
  error["code"] = code ? json::value(*code) : json::value(nullptr);
  return json::serialize(json::object{{"error", std::move(error)}});
}

ApiError bad_request(std::string message, std::optional<std::string> param, std::string code) {
  return {400, std::move(message), "invalid_request_error", std::move(param), std::move(code), {}};
}

ApiError unauthorized(std::string message, std::string code) {
  return {401, std::move(message), "authentication_error", std::nullopt, std::move(code), {}};
}

ApiError forbidden(std::string message, std::string code) {
  return {403, std::move(message), "permission_error", std::nullopt, std::move(code), {}};
}

ApiError not_found(std::string message, std::string code) {
  return {404, std::move(message), "not_found_error", std::nullopt, std::move(code), {}};
}

ApiError rate_limited(std::string message, std::int64_t retry_after_s) {
  return {429, std::move(message), "rate_limit_error", std::nullopt, "rate_limit_exceeded", retry_after_s};
}

ApiError from_backend(const backends::BackendError& error) {
  using backends::ErrorKind;
  switch (error.kind) {
    case ErrorKind::bad_request:
      return error.code.empty() ? bad_request(error.message, error.param)
                                : bad_request(error.message, error.param, error.code);
    case ErrorKind::not_found:
      return not_found(error.message, "model_not_found");
    case ErrorKind::overloaded:
      return {503, error.message, "server_error", std::nullopt, "overloaded", error.retry_after_s.value_or(1)};
    case ErrorKind::rate_limited:
      return {429, error.message, "rate_limit_error", std::nullopt, "upstream_rate_limited", error.retry_after_s};
    case ErrorKind::upstream_failed:
      return {502, error.message, "server_error", std::nullopt, "upstream_error", {}};
    case ErrorKind::timeout:
      return {504, error.message, "server_error", std::nullopt, "upstream_timeout", {}};
    case ErrorKind::internal:
      break;
  }
  return {500, error.message, "server_error", std::nullopt, "internal_error", {}};
}

}  // namespace tollgate::gateway
