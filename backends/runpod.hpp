// A RunPod-style serverless endpoint as a Backend (`type: runpod`): a
// completion becomes a job on the endpoint's native API (/runsync, /run,
// /status, /stream, /cancel), and the job's output, in any of the shapes
// serverless LLM workers give it, becomes CompletionEvents.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "backends/backend.hpp"
#include "backends/backend_factory.hpp"

namespace boost::json {
class value;
}

namespace tollgate::backends {

struct RunpodConfig {
  std::string name;
  std::string base_url = "https://api.runpod.ai/v2";  // the endpoint's API is base_url + "/" + endpoint
  std::string endpoint;                               // the endpoint id: [A-Za-z0-9_-], at most kMaxRunpodId
  std::string api_key;                                // sent as a bearer token; never logged, never returned
  std::chrono::milliseconds connect_timeout{10'000};  // DNS, TCP and TLS
  std::chrono::milliseconds total_timeout{600'000};   // the whole job, polls included
  std::chrono::milliseconds poll_interval{500};       // between two status or stream polls that brought nothing
  std::size_t max_connections = 64;
};

// Endpoint and job ids go into request paths: only these bytes, at most this many.
inline constexpr std::size_t kMaxRunpodId = 128;
bool valid_runpod_id(std::string_view id);

// Bounds of poll_interval_ms.
inline constexpr std::int64_t kMinRunpodPollMs = 10;
inline constexpr std::int64_t kMaxRunpodPollMs = 60'000;

// Throws std::invalid_argument for a bad base_url or endpoint.
std::unique_ptr<Backend> make_runpod_backend(const RunpodConfig& config);

// `type: runpod`: reads base_url, endpoint, api_key, timeouts (connect, total),
// poll_interval_ms and max_connections into a RunpodConfig.
BackendType runpod_backend_type();

// The job's input: {"input": {"prompt" | "messages", "model", "sampling_params"
// (only the parameters set), "stream"}}.
std::string runpod_job_body(const CompletionRequest& request);

// A job's output, or one piece of a streamed one.
struct RunpodOutput {
  std::string text;
  std::string finish_reason;  // empty when the output does not say
  std::optional<Usage> usage;
  std::int64_t tokens = 0;  // pieces the worker counted out (vLLM's token list), 0 when it does not list them
};

// Reads an output in the first shape it has: Tollgate's own job output
// ({text, finish_reason, usage}), RunPod's worker-vllm ([{choices: [{tokens}],
// usage: {input, output}}]), OpenAI's ({choices: [{text | message | delta}],
// usage}), or a plain string. std::nullopt with `error` set for anything else.
std::optional<RunpodOutput> read_runpod_output(const boost::json::value& output, std::string& error);

}  // namespace tollgate::backends
