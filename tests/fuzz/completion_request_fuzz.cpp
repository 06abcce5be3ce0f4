// The gateway's request-body rules (gateway/completion_request.hpp) on a
// client's JSON: chat or text completions, or embeddings, picked by the first
// byte. What they accept must be within the documented bounds; what they
// refuse must be a 400 whose body is valid JSON and echoes nothing unbounded.
#include <boost/json.hpp>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <variant>

#include "gateway/completion_request.hpp"

namespace {

namespace gateway = tollgate::gateway;

// Longer than any message the rules write themselves: an error this long is
// echoing a client's string whole (DESIGN.md: every string is bounded first).
constexpr std::size_t kMaxErrorBody = 1024;

void check(const std::variant<gateway::ParsedCompletion, gateway::ApiError>& result, std::string_view body) {
  if (const auto* error = std::get_if<gateway::ApiError>(&result)) {
    if (error->status != 400) std::abort();
    auto text = error->body();
    if (text.size() > kMaxErrorBody) std::abort();
    boost::json::error_code ec;
    auto parsed = boost::json::parse(text, ec);
    if (ec || !parsed.is_object() || !parsed.as_object().contains("error")) std::abort();
    return;
  }
  const auto& parsed = std::get<gateway::ParsedCompletion>(result);
  const auto& r = parsed.request;
  if (r.model.empty() || r.body != body) std::abort();
  if (r.max_tokens && (*r.max_tokens < 1 || *r.max_tokens > 1'000'000)) std::abort();
  if (r.stop.size() > 4) std::abort();
  for (const auto& s : r.stop) {
    if (s.empty()) std::abort();
  }
  if (r.logprobs && (*r.logprobs < 0 || *r.logprobs > 20)) std::abort();
  if (parsed.include_usage && !r.stream) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0:
      check(gateway::parse_completion_request(body, true), body);
      break;
    case 1:
      check(gateway::parse_completion_request(body, false), body);
      break;
    default:
      check(gateway::parse_embeddings_request(body), body);
      break;
  }
  return 0;
}
