// A job API body, judged without I/O: {"input", "webhook", "policy"} turned
// into the completion the job runs (gateway/jobs.hpp runs it).
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <variant>

#include "backends/backend.hpp"
#include "gateway/config.hpp"
#include "gateway/http_error.hpp"

namespace tollgate::gateway {

// A job body's `input` and `policy`, checked and turned into a completion.
struct JobSpec {
  backends::CompletionRequest request;  // validated, `model` the endpoint's model
  std::string webhook;                  // empty: none
  std::chrono::milliseconds execution_timeout{0};
  std::chrono::milliseconds ttl{0};
};

// Parses {"input": {"prompt" | "messages", "sampling_params", "stream"}, "webhook", "policy":
// {"executionTimeout", "ttl"}} for `endpoint`: a 400 names what is wrong. Pure.
std::variant<JobSpec, ApiError> parse_job_body(std::string_view body, const JobEndpointConfig& endpoint);

// "job-" and 32 random hex digits.
std::string new_job_id();
// What a job id in a path may look like (checked before any lookup).
bool plausible_job_id(std::string_view id);

}  // namespace tollgate::gateway
