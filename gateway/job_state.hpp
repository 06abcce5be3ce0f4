// What the job manager keeps per job, shared by gateway/jobs.cpp (queues,
// lookups and the owner's operations) and gateway/job_run.cpp (running one
// job through the completion flow). Private to the gateway library.
#pragma once

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/value.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gateway/jobs.hpp"

namespace tollgate::gateway {

struct JobManager::Run {
  explicit Run(boost::asio::any_io_executor ex) : deadline(std::move(ex)) {}
  boost::asio::steady_timer deadline;  // the execution timeout; cancelled to stop the job early
  std::atomic<bool> stop{false};
  bool cancelled = false;  // by its owner
  bool shut_down = false;  // by the gateway's shutdown
};

struct JobManager::Job {
  metering::JobRecord rec;
  const JobEndpointConfig* endpoint = nullptr;
  backends::CompletionRequest request;
  std::int64_t prompt_estimate = 0;
  std::optional<metering::Admission> admission;
  bool running = false;
  // The output so far, as the backend produced it.
  std::vector<std::string> pieces;
  std::size_t streamed = 0;     // pieces already returned by /stream
  bool end_streamed = false;    // the final stream item (finish reason, usage) went out
  std::string finish_reason;
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::uint64_t version = 1;
  std::vector<std::weak_ptr<boost::asio::steady_timer>> waiters;
  std::shared_ptr<Run> run;

  std::string text() const {
    std::string t;
    for (const auto& p : pieces) t += p;
    return t;
  }
};

// A token count from a usage object: 0 when absent or not an integer.
inline std::int64_t json_int_or_zero(const boost::json::value* v) {
  if (!v) return 0;
  if (v->is_int64()) return v->as_int64();
  if (v->is_uint64()) return static_cast<std::int64_t>(v->as_uint64());
  return 0;
}

}  // namespace tollgate::gateway
