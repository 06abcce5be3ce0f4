// One completion from plan to final byte: start the first deployment, relay
// its events, record its health, and fall back to the next while nothing has
// reached the client. Talks to the client only through CompletionClient, so
// the fallback rules are tested without sockets.
#pragma once

#include <atomic>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backends/backend.hpp"
#include "backends/router.hpp"
#include "gateway/event_queue.hpp"
#include "gateway/gateway_metrics.hpp"
#include "gateway/http_error.hpp"
#include "metering/types.hpp"

namespace tollgate::gateway {

// The client's side of a completion: the HTTP session, or a test.
class CompletionClient {
 public:
  virtual ~CompletionClient() = default;
  // The backend's next events from `queue`. With `watch`, a client that
  // hangs up meanwhile ends the wait with nullopt.
  virtual boost::asio::awaitable<std::optional<std::deque<backends::CompletionEvent>>> next_events(EventQueue& queue,
                                                                                                   bool watch) = 0;
  // A streamed answer: one piece of SSE data (the first sends the head); false when the client is gone.
  virtual boost::asio::awaitable<bool> send_event(std::string sse) = 0;
  // Ends a streamed answer; whether the connection stays open.
  virtual boost::asio::awaitable<bool> end_stream() = 0;
  // A whole 200 answer, or an error before anything was sent; whether the connection stays open.
  virtual boost::asio::awaitable<bool> send_answer(std::string body) = 0;
  virtual boost::asio::awaitable<bool> send_error(const ApiError& error) = 0;
  // The request's final status, for metrics and its usage row: called once, before the last bytes go out.
  virtual void finish(int status) = 0;
  // The queue of the call now running, so a forced shutdown can tell it why it ends.
  virtual void attach(std::shared_ptr<EventQueue> queue) = 0;
};

// A request the gateway has admitted, and where it may go.
struct CompletionJob {
  backends::CompletionRequest request;            // validated; `user` set
  bool include_usage = false;                     // stream_options.include_usage
  std::vector<const backends::Deployment*> plan;  // in the order to try; not empty
  std::int64_t prompt_estimate = 0;               // what the quota reserved for the prompt
};

// What a running completion reads and updates besides the client.
struct CompletionContext {
  const backends::Router& router;
  GatewayMetrics& metrics;
  const std::atomic<bool>& cut_off;  // the shutdown grace ran out: no more fallbacks
  std::chrono::steady_clock::time_point started;
  metering::UsageEvent& usage;  // tokens, backend and time to first token, kept current
  std::chrono::microseconds& backend_time;
  boost::asio::thread_pool* prepare_pool = nullptr;  // where costly prompt preparation runs; null: in place
};

// Failures another deployment might not have: worth a fallback, and counted
// against the deployment's health (5xx, connection failures, 429, timeouts).
bool retryable(backends::ErrorKind kind);

// Renders and tokenises `request`'s prompt for `backend` (Backend::prepare),
// on `pool` when the backend says that is costly, so a long prompt never
// stalls an io thread; returns the prompt's tokens.
boost::asio::awaitable<std::int64_t> prepare_prompt(const backends::Backend& backend,
                                                    backends::CompletionRequest& request,
                                                    boost::asio::thread_pool* pool);

// Runs `job` to its end; returns whether the client's connection stays open.
boost::asio::awaitable<bool> run_completion(CompletionContext ctx, CompletionJob job, CompletionClient& client);

}  // namespace tollgate::gateway
