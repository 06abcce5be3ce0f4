#include "gateway/job_request.hpp"

#include <openssl/rand.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cctype>
#include <set>
#include <stdexcept>

#include "gateway/completion_request.hpp"
#include "gateway/webhook.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace json = boost::json;

constexpr std::size_t kMaxWebhookUrl = 2048;
constexpr std::int64_t kMinTimeoutMs = 1'000;
constexpr std::int64_t kMaxTimeoutMs = 7LL * 24 * 3600 * 1000;

const std::set<std::string, std::less<>> kSamplingParams{
    "max_tokens",       "temperature",       "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
    "frequency_penalty", "repetition_penalty"};

std::optional<std::int64_t> milliseconds_value(const json::value& v) {
  if (v.is_int64()) return v.as_int64();
  if (v.is_uint64() && v.as_uint64() <= static_cast<std::uint64_t>(kMaxTimeoutMs)) {
    return static_cast<std::int64_t>(v.as_uint64());
  }
  if (v.is_double() && v.as_double() >= 0 && v.as_double() <= static_cast<double>(kMaxTimeoutMs)) {
    return static_cast<std::int64_t>(v.as_double());
  }
  return std::nullopt;
}

}  // namespace

std::variant<JobSpec, ApiError> parse_job_body(std::string_view body, const JobEndpointConfig& endpoint) {
  boost::system::error_code ec;
  json::value doc = json::parse(body, ec);
  if (ec || !doc.is_object()) return bad_request("the body must be a JSON object with an 'input' object");
  const auto& root = doc.as_object();
  const auto* input = root.if_contains("input");
  if (!input || !input->is_object()) return bad_request("'input' must be an object", "input");
  const auto& in = input->as_object();

  JobSpec spec;
  spec.execution_timeout = endpoint.execution_timeout;
  spec.ttl = endpoint.result_ttl;
  if (const auto* w = root.if_contains("webhook"); w && !w->is_null()) {
    if (!w->is_string()) return bad_request("'webhook' must be a URL", "webhook");
    std::string url(w->as_string());
    if (url.size() > kMaxWebhookUrl) return bad_request("'webhook' is longer than 2048 characters", "webhook");
    if (auto problem = check_webhook_url(url)) return bad_request("'webhook': " + *problem, "webhook");
    spec.webhook = std::move(url);
  }
  if (const auto* p = root.if_contains("policy"); p && !p->is_null()) {
    if (!p->is_object()) return bad_request("'policy' must be an object", "policy");
    for (const auto& [key, value] : p->as_object()) {
      if (key != "executionTimeout" && key != "ttl") {
        return bad_request("unknown policy '" + metering::excerpt(key) + "' (executionTimeout, ttl)", "policy");
      }
      auto ms = milliseconds_value(value);
      if (!ms || *ms < kMinTimeoutMs || *ms > kMaxTimeoutMs) {
        return bad_request("'policy." + std::string(key) + "' must be milliseconds from 1000 to 604800000",
                           "policy." + std::string(key));
      }
      (key == "ttl" ? spec.ttl : spec.execution_timeout) = std::chrono::milliseconds(*ms);
    }
  }

  const bool chat = in.contains("messages");
  if (chat == in.contains("prompt")) return bad_request("'input' needs 'prompt' or 'messages' (one of them)", "input");
  // The completion this job runs, in the shape /v1 accepts, so one parser judges both.
  json::object completion;
  completion["model"] = endpoint.model;
  completion[chat ? "messages" : "prompt"] = in.at(chat ? "messages" : "prompt");
  for (const auto& [key, value] : endpoint.defaults) {
    boost::system::error_code number_ec;
    auto parsed = json::parse(value, number_ec);
    completion[key] = number_ec ? json::value(value) : parsed;
  }
  for (const auto& [key, value] : in) {
    if (key == "prompt" || key == "messages") continue;
    if (key == "stream") {
      if (!value.is_bool()) return bad_request("'input.stream' must be true or false", "input.stream");
      continue;
    }
    if (key != "sampling_params") {
      return bad_request("unknown input '" + metering::excerpt(key) + "' (prompt, messages, sampling_params, stream)",
                         "input");
    }
    if (!value.is_object()) return bad_request("'input.sampling_params' must be an object", "input.sampling_params");
    for (const auto& [name, param] : value.as_object()) {
      if (!kSamplingParams.contains(std::string_view(name))) {
        return bad_request("unknown sampling parameter '" + metering::excerpt(name) + "'", "input.sampling_params");
      }
      completion[name] = param;
    }
  }
  // Jobs always run streamed where the backend can, so /stream can follow them.
  auto parsed = parse_completion_request(json::serialize(completion), chat);
  if (auto* e = std::get_if<ApiError>(&parsed)) {
    if (e->param) e->param = "input." + *e->param;
    return *e;
  }
  spec.request = std::move(std::get<ParsedCompletion>(parsed).request);
  return spec;
}

std::string new_job_id() {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof bytes) != 1) throw std::runtime_error("no randomness for a job id");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id = "job-";
  for (unsigned char b : bytes) {
    id += kHex[b >> 4];
    id += kHex[b & 15];
  }
  return id;
}

bool plausible_job_id(std::string_view id) {
  return !id.empty() && id.size() <= 64 && std::all_of(id.begin(), id.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_';
  });
}

}  // namespace tollgate::gateway
