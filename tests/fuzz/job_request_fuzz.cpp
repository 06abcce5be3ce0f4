// The job API's body rules (gateway/job_request.hpp) on a client's JSON, and
// the webhook URL check they call: what they accept must be within the
// documented bounds (a prompt or messages, timeouts from 1 s to 7 days, a
// webhook that passes check_webhook_url); what they refuse must be a 400
// whose body is valid JSON and echoes nothing unbounded.
#include <boost/json.hpp>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <variant>

#include "gateway/job_request.hpp"
#include "gateway/webhook.hpp"

namespace {

namespace gateway = tollgate::gateway;
using namespace std::chrono_literals;

constexpr std::size_t kMaxErrorBody = 1024;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  gateway::JobEndpointConfig endpoint;
  endpoint.name = "fuzz";
  endpoint.model = "echo";
  endpoint.defaults = {{"max_tokens", "16"}, {"temperature", "0.5"}};
  auto result = gateway::parse_job_body(body, endpoint);
  if (const auto* error = std::get_if<gateway::ApiError>(&result)) {
    if (error->status != 400) std::abort();
    auto text = error->body();
    if (text.size() > kMaxErrorBody) std::abort();
    boost::json::error_code ec;
    auto parsed = boost::json::parse(text, ec);
    if (ec || !parsed.is_object() || !parsed.as_object().contains("error")) std::abort();
  } else {
    const auto& spec = std::get<gateway::JobSpec>(result);
    const auto& r = spec.request;
    if (r.model != "echo") std::abort();
    if (r.chat() && r.messages.empty()) std::abort();
    if (spec.execution_timeout < 1s || spec.execution_timeout > 7 * 24h) std::abort();
    if (spec.ttl < 1s || spec.ttl > 7 * 24h) std::abort();
    if (!spec.webhook.empty() && (spec.webhook.size() > 2048 || gateway::check_webhook_url(spec.webhook))) {
      std::abort();
    }
    if (r.max_tokens && (*r.max_tokens < 1 || *r.max_tokens > 1'000'000)) std::abort();
  }
  // The URL check on its own, on the raw bytes: a message never quotes them.
  // Its messages are fixed sentences, so an input that is itself a piece of
  // one ("not an absolute URL") is found in it without being quoted: only an
  // input holding a byte no message uses tells the two apart.
  if (auto problem = gateway::check_webhook_url(body)) {
    constexpr std::string_view kMessageBytes =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ./:,'-";
    bool foreign = body.find_first_not_of(kMessageBytes) != std::string_view::npos;
    if (problem->size() > 256 || (foreign && problem->find(body) != std::string::npos)) std::abort();
  }
  return 0;
}
