// The serverless-style job API's engine (/v2/{endpoint}/...): jobs are
// persisted in the store before they are acknowledged, queued per endpoint,
// run through the same completion flow as /v1 requests (routing, fallback,
// metering) with at most max_concurrency at a time, and announced to a signed
// webhook when they end. Running one job is gateway/job_run.cpp; the HTTP
// side is gateway/session_jobs.cpp.
//
// Threads: every job runs on one executor (the first io context); sessions on
// other threads read and change jobs under the manager's mutex, and wait for a
// change on their own executor.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "backends/backend.hpp"
#include "gateway/auth.hpp"
#include "gateway/config.hpp"
#include "gateway/http_error.hpp"
#include "gateway/job_request.hpp"
#include "metering/quota.hpp"
#include "metering/store.hpp"

namespace tollgate::gateway {

struct Gateway;
class JobWriter;

// A job as its owner sees it: the status answer's fields.
struct JobSnapshot {
  metering::JobRecord record;
  std::string output_json;                // a completed job's output object; empty otherwise
  std::vector<std::string> stream_items;  // /stream only: the output since the last call, as JSON objects
};

// The status answer: {"id", "status", "delayTime", "executionTime", "output"?, "error"?}.
std::string job_status_body(const JobSnapshot& job);

class JobManager {
 public:
  JobManager(Gateway& gw, boost::asio::any_io_executor executor);
  ~JobManager();
  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  const JobEndpointConfig* endpoint(std::string_view name) const;

  // At start, before serving (blocking): queues again what the last run left
  // IN_QUEUE; an interrupted IN_PROGRESS job fails or is queued again as its
  // endpoint says. Then starts the purge timer and the queued jobs.
  void recover();
  // SIGTERM: no job starts from now on; running ones may finish.
  void stop_starting();
  // The shutdown grace ran out: running jobs are told to end now.
  void cut_off();
  // Before the io contexts go: drops every job (their timers live on those contexts).
  void release();
  std::size_t running() const;

  // A job admitted by its caller's quota: persisted, then queued. The error
  // is a 429 when the endpoint's queue is full, a 503 when the store failed.
  struct Submission {
    const JobEndpointConfig* endpoint = nullptr;
    JobSpec spec;
    std::string body;  // as submitted, kept for a restart
    std::shared_ptr<const KeyEntry> caller;
    metering::Admission admission;
    std::int64_t prompt_estimate = 0;
  };
  boost::asio::awaitable<std::variant<std::string, ApiError>> submit(Submission submission);

  // The job, when it exists, belongs to `user_id` and runs on `endpoint`; a
  // snapshot for /stream also takes the output not yet streamed.
  boost::asio::awaitable<std::optional<JobSnapshot>> find(std::string_view endpoint, std::string_view id,
                                                          std::int64_t user_id, bool take_stream = false);
  // Waits until the job changes (new output or a new state) or `deadline`.
  boost::asio::awaitable<void> wait_for_change(std::string_view id, std::uint64_t seen_version,
                                               std::chrono::steady_clock::time_point deadline);
  // The job's change counter (0 when unknown), for wait_for_change.
  std::uint64_t version(std::string_view id) const;

  // Cancels a queued job at once and a running one as soon as its backend
  // stops; nullopt when there is no such job of this user.
  boost::asio::awaitable<std::optional<JobSnapshot>> cancel(std::string_view endpoint, std::string_view id,
                                                            std::int64_t user_id);
  // Queues a FAILED or TIMED_OUT job again, admitted anew by `admission`.
  boost::asio::awaitable<std::variant<JobSnapshot, ApiError>> retry(std::string_view endpoint, std::string_view id,
                                                                    std::shared_ptr<const KeyEntry> caller,
                                                                    const metering::Admission& admission);
  // Cancels every queued job of this user on `endpoint`; how many.
  boost::asio::awaitable<std::size_t> purge_queue(std::string_view endpoint, std::int64_t user_id);
  // {"jobs": {"inQueue", "inProgress", "completed", "failed", "cancelled", "timedOut"}, "workers": {...}}.
  std::string health_body(std::string_view endpoint) const;

 private:
  struct Job;
  struct Run;
  class Client;

  void enqueue_locked(const std::shared_ptr<Job>& job);
  void pump();  // starts queued jobs while their endpoints have room
  boost::asio::awaitable<void> run(std::shared_ptr<Job> job);
  boost::asio::awaitable<void> finish(std::shared_ptr<Job> job, metering::JobState state, std::string error);
  boost::asio::awaitable<void> purge_loop();
  boost::asio::awaitable<void> announce(std::string url, std::string id, std::string body);
  // Writes `record` through the group commit (job_writer.hpp); whether it
  // landed. A failed update is logged: the job goes on in memory.
  boost::asio::awaitable<bool> persist(metering::JobRecord record, bool insert = false);
  void changed_locked(Job& job);  // bumps the version and wakes waiters
  JobSnapshot snapshot_locked(Job& job, bool take_stream);
  void count_active_locked(const Job& job, int delta);

  Gateway& gw_;
  boost::asio::any_io_executor executor_;
  std::unique_ptr<JobWriter> writer_;
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Job>, std::less<>> jobs_;  // live and recently finished
  struct EndpointState {
    std::vector<std::shared_ptr<Job>> queue;  // FIFO: front at index 0
    std::size_t running = 0;
    std::map<metering::JobState, std::int64_t> ended;  // since start
  };
  std::map<std::string, EndpointState, std::less<>> endpoints_;
  std::size_t running_total_ = 0;
  bool starting_stopped_ = false;
  bool cut_off_ = false;
  std::shared_ptr<bool> alive_;
};

}  // namespace tollgate::gateway
