#include "gateway/completion_flow.hpp"

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <iostream>
#include <iterator>

#include "gateway/completion_response.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
using net::awaitable;
using SteadyClock = std::chrono::steady_clock;

std::int64_t micros_since(SteadyClock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - t).count();
}

std::string error_kind_label(backends::ErrorKind kind) {
  using backends::ErrorKind;
  switch (kind) {
    case ErrorKind::bad_request:
      return "bad_request";
    case ErrorKind::not_found:
      return "not_found";
    case ErrorKind::overloaded:
      return "overloaded";
    case ErrorKind::upstream_failed:
      return "upstream_failed";
    case ErrorKind::timeout:
      return "timeout";
    case ErrorKind::rate_limited:
      return "rate_limited";
    case ErrorKind::internal:
      break;
  }
  return "internal";
}

// The answer taking shape: streamed piece by piece, or gathered for one reply.
struct Answer {
  std::string text;
  std::vector<backends::TokenLogprob> logprobs;
  std::string extra_json;   // the backend's tool_calls and such
  std::int64_t deltas = 0;  // what reached the client, should the backend never report usage
};

enum class Next { more, retry, end };

// Coroutines take their state as parameters, never as lambda captures: g++ 12
// destroys a capturing coroutine lambda's captures twice.
awaitable<std::int64_t> prepare_on(const backends::Backend* backend, backends::CompletionRequest* request) {
  co_return backend->prepare(*request);
}

}  // namespace

awaitable<std::int64_t> prepare_prompt(const backends::Backend& backend, backends::CompletionRequest& request,
                                       net::thread_pool* pool) {
  if (!pool || !backend.costly_prepare()) co_return backend.prepare(request);
  // The request stays put: this coroutine is suspended until the pool is done with it.
  co_return co_await net::co_spawn(*pool, prepare_on(&backend, &request), net::use_awaitable);
}

bool retryable(backends::ErrorKind kind) {
  using backends::ErrorKind;
  return kind == ErrorKind::upstream_failed || kind == ErrorKind::timeout || kind == ErrorKind::rate_limited ||
         kind == ErrorKind::overloaded;
}

// g++ 12 sees Asio's frame allocator (aligned_alloc, freed by the frame's own
// operator delete) through enough inlining here to call it a mismatch: a
// known false positive for coroutine frames, silenced for this function only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
awaitable<bool> run_completion(CompletionContext ctx, CompletionJob job, CompletionClient& client) {
  auto& creq = job.request;
  const bool stream = creq.stream;
  CompletionFormatter format(creq.chat(), creq.model, job.include_usage, creq.logprobs.has_value());
  Answer answer;
  auto& usage = ctx.usage;
  auto backend_time_since = [&ctx](SteadyClock::time_point t) {
    ctx.backend_time = std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - t);
  };

  // Deployments are tried in the plan's order until one answers; a retryable
  // failure moves on only while nothing has reached the client.
  for (std::size_t attempt = 0;; ++attempt) {
    const backends::Deployment& deployment = *job.plan[attempt];
    backends::InFlight in_flight(deployment);
    auto* backend = deployment.backend;
    usage.backend = backend->name();
    // A fallback to another kind of backend renders and tokenises the prompt its own way.
    if (creq.prepared && creq.prepared->backend != backend && backend->costly_prepare()) {
      co_await prepare_prompt(*backend, creq, ctx.prepare_pool);
    }
    backends::CompletionRequest attempt_request = creq;
    attempt_request.upstream_model = deployment.upstream_model;
    auto queue = std::make_shared<EventQueue>(co_await net::this_coro::executor);
    client.attach(queue);
    auto backend_started = SteadyClock::now();
    std::unique_ptr<backends::CompletionHandle> handle;
    try {
      handle = creq.embeddings() ? backend->embed(std::move(attempt_request), queue)
                                 : backend->start(std::move(attempt_request), queue);
    } catch (const std::exception& e) {
      // A backend bug must not take the connection down with an unmetered request.
      std::cerr << "tollgate: backend " << usage.backend << " failed to start: " << e.what() << "\n";
    }
    if (!handle) {
      auto failed = from_backend({backends::ErrorKind::internal, "the backend failed", {}});
      client.finish(failed.status);
      co_return co_await client.send_error(failed);
    }
    for (;;) {
      auto next = co_await client.next_events(*queue, !stream);
      if (!next) {
        handle->cancel();
        backend_time_since(backend_started);
        client.finish(499);  // the client hung up while the answer was being produced
        co_return false;
      }
      Next step = Next::more;
      for (auto& ev : *next) {
        switch (ev.type) {
          case backends::CompletionEvent::Type::delta:
            // Kept current so a request cut short (disconnect, forced shutdown)
            // is metered with what it produced: the producer's running count
            // where it keeps one (the local engine), else estimated.
            if (ev.usage.completion_tokens > 0) {
              usage.prompt_tokens = ev.usage.prompt_tokens;
              usage.completion_tokens = ev.usage.completion_tokens;
              usage.estimated = ev.usage.estimated;
            } else {
              usage.prompt_tokens = job.prompt_estimate;
              usage.completion_tokens = answer.deltas + 1;
              usage.estimated = true;
            }
            if (answer.deltas++ == 0 && stream) {
              usage.ttft_us = micros_since(ctx.started);
              ctx.metrics.time_to_first_token.labels({usage.model, usage.backend})
                  .observe(static_cast<double>(*usage.ttft_us) / 1e6);
            }
            if (!stream) {
              answer.text += ev.text;
              std::move(ev.logprobs.begin(), ev.logprobs.end(), std::back_inserter(answer.logprobs));
              if (!ev.extra_json.empty()) answer.extra_json = std::move(ev.extra_json);
            } else if (!co_await client.send_event(format.delta_event(ev.text, ev.logprobs, ev.extra_json))) {
              handle->cancel();
              backend_time_since(backend_started);
              client.finish(499);  // the client went away mid-stream
              co_return false;
            }
            break;
          case backends::CompletionEvent::Type::done: {
            backend_time_since(backend_started);
            ctx.metrics.backend_duration.labels({usage.backend})
                .observe(std::chrono::duration<double>(ctx.backend_time).count());
            ctx.router.record_success(deployment);
            usage.prompt_tokens = ev.usage.prompt_tokens;
            usage.completion_tokens = ev.usage.completion_tokens;
            usage.estimated = ev.usage.estimated;
            if (!stream) {
              std::string body = creq.embeddings() ? std::move(ev.body)
                                                   : format.full_response(answer.text, ev.finish_reason, ev.usage,
                                                                          answer.logprobs, answer.extra_json);
              client.finish(200);
              co_return co_await client.send_answer(std::move(body));
            }
            std::string tail = format.finish_event(ev.finish_reason);
            if (job.include_usage) tail += format.usage_event(ev.usage);
            tail += CompletionFormatter::done_event();
            bool sent = co_await client.send_event(std::move(tail));
            client.finish(sent ? 200 : 499);
            if (!sent) co_return false;
            co_return co_await client.end_stream();
          }
          case backends::CompletionEvent::Type::error: {
            backend_time_since(backend_started);
            ctx.metrics.backend_duration.labels({usage.backend})
                .observe(std::chrono::duration<double>(ctx.backend_time).count());
            ctx.metrics.backend_errors.labels({usage.backend, error_kind_label(ev.error.kind)}).inc();
            if (retryable(ev.error.kind)) ctx.router.record_failure(deployment);
            if (retryable(ev.error.kind) && answer.deltas == 0 && attempt + 1 < job.plan.size() && !ctx.cut_off) {
              // Nothing reached the client: back off a little, then the next deployment.
              net::steady_timer backoff(co_await net::this_coro::executor);
              backoff.expires_after(std::chrono::milliseconds(std::min<std::int64_t>(1000, 50LL << attempt)));
              co_await backoff.async_wait(net::as_tuple(net::use_awaitable));
              step = Next::retry;
              break;
            }
            // Without a count from the backend (a shutdown cut, say), what
            // reached the client stays metered as estimated above.
            if (ev.usage.prompt_tokens || ev.usage.completion_tokens) {
              usage.prompt_tokens = ev.usage.prompt_tokens;
              usage.completion_tokens = ev.usage.completion_tokens;
              usage.estimated = ev.usage.estimated;
            }
            auto api_error = from_backend(ev.error);
            client.finish(api_error.status);
            if (answer.deltas == 0 || !stream) co_return co_await client.send_error(api_error);
            // Mid-stream: the status is already 200; an error event tells the client, and the stream ends.
            if (co_await client.send_event(format.error_event(api_error))) co_await client.end_stream();
            co_return false;
          }
        }
        if (step == Next::retry) break;
      }
      if (step == Next::retry) break;
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace tollgate::gateway
