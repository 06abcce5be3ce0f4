// Running one job: the completion flow with a client that collects the
// answer instead of writing it, then the job's end (stored, metered once,
// announced to its webhook) and the next queued job started.
#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>
#include <iostream>

#include "gateway/completion_flow.hpp"
#include "gateway/gateway_state.hpp"
#include "gateway/job_state.hpp"
#include "gateway/job_writer.hpp"
#include "gateway/webhook.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace json = boost::json;
using net::awaitable;
using metering::JobState;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

std::string output_json(const std::string& text, const std::string& finish_reason, std::int64_t prompt_tokens,
                        std::int64_t completion_tokens) {
  json::object usage{{"prompt_tokens", prompt_tokens},
                     {"completion_tokens", completion_tokens},
                     {"total_tokens", prompt_tokens + completion_tokens}};
  json::object out{{"text", text}, {"usage", std::move(usage)}};
  out["finish_reason"] = finish_reason.empty() ? json::value(nullptr) : json::value(finish_reason);
  return json::serialize(out);
}

}  // namespace

// g++ 12 sees Asio's frame allocator (aligned_alloc, freed by the frame's own
// operator delete) through enough inlining in these coroutines to call it a
// mismatch: the known coroutine-frame false positive (see completion_flow.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

// The completion flow's client for a job: collects the answer instead of writing it.
class JobManager::Client final : public CompletionClient {
 public:
  Client(JobManager& manager, std::shared_ptr<Job> job, std::shared_ptr<Run> run)
      : manager_(manager), job_(std::move(job)), run_(std::move(run)) {}

  awaitable<std::optional<std::deque<backends::CompletionEvent>>> next_events(EventQueue& queue, bool) override {
    using namespace net::experimental::awaitable_operators;
    if (run_->stop) co_return std::nullopt;
    auto next = co_await (queue.next() || run_->deadline.async_wait(as_tuple));
    if (next.index() == 0) co_return std::move(std::get<0>(next));
    co_return std::nullopt;  // timed out, cancelled, or cut by the shutdown
  }

  awaitable<bool> send_event(std::string sse) override {
    std::size_t pos = 0;
    while (pos < sse.size()) {
      auto end = sse.find('\n', pos);
      if (end == std::string::npos) end = sse.size();
      std::string_view line(sse.data() + pos, end - pos);
      pos = end + 1;
      if (!line.starts_with("data: ") || line == "data: [DONE]") continue;
      take_chunk(line.substr(6));
    }
    co_return true;
  }

  awaitable<bool> end_stream() override { co_return true; }

  awaitable<bool> send_answer(std::string body) override {
    take_chunk(body);
    co_return true;
  }

  awaitable<bool> send_error(const ApiError& error) override {
    error_ = error.message;
    co_return true;
  }

  void finish(int status) override { status_ = status; }
  void attach(std::shared_ptr<EventQueue>) override {}

  int status() const { return status_; }
  const std::string& error() const { return error_; }

 private:
  // One chat or text completion object (a whole answer or a stream chunk).
  void take_chunk(std::string_view text) {
    boost::system::error_code ec;
    auto doc = json::parse(text, ec);
    if (ec || !doc.is_object()) return;
    const auto& obj = doc.as_object();
    if (const auto* e = obj.if_contains("error"); e && e->is_object()) {
      if (const auto* m = e->as_object().if_contains("message"); m && m->is_string()) error_ = m->as_string();
      return;
    }
    std::string piece, finish;
    if (const auto* choices = obj.if_contains("choices"); choices && choices->is_array() &&
                                                          !choices->as_array().empty()) {
      const auto& c = choices->as_array().front();
      if (c.is_object()) {
        const auto& co = c.as_object();
        const json::value* content = nullptr;
        if (const auto* t = co.if_contains("text")) content = t;
        for (const char* holder : {"delta", "message"}) {
          if (const auto* d = co.if_contains(holder); d && d->is_object()) content = d->as_object().if_contains("content");
        }
        if (content && content->is_string()) piece = content->as_string();
        if (const auto* f = co.if_contains("finish_reason"); f && f->is_string()) finish = f->as_string();
      }
    }
    const json::value* usage = obj.if_contains("usage");
    std::lock_guard lock(manager_.mutex_);
    auto& job = *job_;
    if (!piece.empty()) job.pieces.push_back(std::move(piece));
    if (!finish.empty()) job.finish_reason = finish;
    if (usage && usage->is_object()) {
      job.prompt_tokens = json_int_or_zero(usage->as_object().if_contains("prompt_tokens"));
      job.completion_tokens = json_int_or_zero(usage->as_object().if_contains("completion_tokens"));
    }
    manager_.changed_locked(job);
  }

  JobManager& manager_;
  std::shared_ptr<Job> job_;
  std::shared_ptr<Run> run_;
  int status_ = 0;
  std::string error_;
};

awaitable<bool> JobManager::persist(metering::JobRecord record, bool insert) {
  const std::string id = record.id;
  const auto ticket = writer_->enqueue({insert, std::move(record)});
  const bool stored = co_await run_blocking(gw_, [this, ticket] { return writer_->commit_through(ticket); });
  // An update that did not land: the job goes on in memory, and a restart
  // would see its last stored state.
  if (!stored && !insert) std::cerr << "tollgate: storing job " << id << " failed\n";
  co_return stored;
}

awaitable<void> JobManager::run(std::shared_ptr<Job> job) {
  metering::JobRecord started;
  std::shared_ptr<Run> run;
  backends::CompletionRequest request;
  {
    std::lock_guard lock(mutex_);
    started = job->rec;
    run = job->run;
    request = job->request;
  }
  co_await persist(started);
  const std::string endpoint_name = started.endpoint;
  gw_.metrics.job_queue_wait.labels({endpoint_name})
      .observe(static_cast<double>(started.started_at - started.created_at) / 1e3);

  // Planned now, not at submission: deployments may have cooled down or recovered meanwhile.
  CompletionJob completion;
  completion.include_usage = true;
  completion.plan = gw_.router.plan(request.model);
  const bool chat = request.chat();
  std::erase_if(completion.plan, [&](const backends::Deployment* d) {
    auto caps = d->backend->capabilities();
    return chat ? !caps.chat : !caps.completions;
  });
  request.stream = std::any_of(completion.plan.begin(), completion.plan.end(),
                               [](const backends::Deployment* d) { return d->backend->capabilities().streaming; });
  if (request.stream) {
    std::erase_if(completion.plan,
                  [](const backends::Deployment* d) { return !d->backend->capabilities().streaming; });
  }
  if (completion.plan.empty()) {
    std::string why = "the model '" + metering::excerpt(request.model) + "' is not served now";
    co_await finish(job, JobState::failed, std::move(why));
    co_return;
  }
  std::int64_t prompt_estimate = job->prompt_estimate;
  if (!request.prepared || request.prepared->backend != completion.plan.front()->backend) {
    prompt_estimate = co_await prepare_prompt(*completion.plan.front()->backend, request, &gw_.prepare_pool);
  }
  completion.prompt_estimate = prompt_estimate;
  completion.request = std::move(request);

  metering::UsageEvent usage;
  usage.ts = metering::now_ms();
  usage.route = "/v2/run";
  usage.model = completion.request.model;
  usage.user_id = started.user_id;
  usage.key_id = started.key_id;
  std::chrono::microseconds backend_time{0};
  auto began = SteadyClock::now();
  Client client(*this, job, run);
  CompletionContext ctx{gw_.router, gw_.metrics, gw_.cut_off, began, usage, backend_time, &gw_.prepare_pool};
  co_await run_completion(ctx, std::move(completion), client);

  JobState state = JobState::completed;
  std::string error;
  bool requeue = false;
  int status = client.status();
  if (run->cancelled) {
    state = JobState::cancelled;
  } else if (run->shut_down) {
    state = JobState::failed;
    error = "the gateway stopped while the job ran";
    requeue = job->endpoint && job->endpoint->requeue_interrupted;
    status = 503;
  } else if (status == 499) {
    state = JobState::timed_out;
    error = "the job ran longer than its execution timeout";
    status = 504;
  } else if (status != 200) {
    state = JobState::failed;
    error = client.error().empty() ? "the backend failed" : client.error();
  }

  // One usage row per run, counted like any admitted request.
  usage.status = status;
  usage.latency_us = std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - began).count();
  std::optional<metering::Admission> admission;
  {
    std::lock_guard lock(mutex_);
    admission = std::exchange(job->admission, std::nullopt);
    if (state == JobState::completed) {
      // The flow's count is the backend's; the chunk's usage says the same or nothing.
      job->prompt_tokens = usage.prompt_tokens;
      job->completion_tokens = usage.completion_tokens;
    }
  }
  auto& m = gw_.metrics;
  if (usage.prompt_tokens || usage.completion_tokens) {
    m.tokens.labels({"prompt", usage.model, usage.backend}).inc(static_cast<double>(usage.prompt_tokens));
    m.tokens.labels({"completion", usage.model, usage.backend}).inc(static_cast<double>(usage.completion_tokens));
  }
  if (admission) {
    gw_.quotas.settle(*admission, usage.prompt_tokens + usage.completion_tokens, metering::now_ms());
  }
  usage.counted = admission.has_value();
  if (!gw_.usage->enqueue(std::move(usage))) m.metering_rows_dropped.inc();

  if (requeue) {
    metering::JobRecord again;
    {
      std::lock_guard lock(mutex_);
      auto& endpoint = endpoints_[job->rec.endpoint];
      --endpoint.running;
      --running_total_;
      count_active_locked(*job, -1);
      job->running = false;
      job->run.reset();
      job->rec.state = JobState::in_queue;
      job->rec.started_at = 0;
      job->pieces.clear();
      job->streamed = 0;
      changed_locked(*job);
      again = job->rec;
    }
    co_await persist(again);  // runs again after the restart
    co_return;
  }
  co_await finish(job, state, std::move(error));
}

awaitable<void> JobManager::finish(std::shared_ptr<Job> job, JobState state, std::string error) {
  metering::JobRecord record;
  std::optional<metering::Admission> unused;
  {
    std::lock_guard lock(mutex_);
    unused = std::exchange(job->admission, std::nullopt);
    auto& endpoint = endpoints_[job->rec.endpoint];
    count_active_locked(*job, -1);
    if (job->running) {
      --endpoint.running;
      --running_total_;
      job->running = false;
    }
    job->run.reset();
    const auto now = metering::now_ms();
    job->rec.state = state;
    job->rec.error = std::move(error);
    job->rec.finished_at = now;
    job->rec.expires_at = now + job->rec.ttl_ms;
    if (state == JobState::completed) {
      job->rec.output = output_json(job->text(), job->finish_reason, job->prompt_tokens, job->completion_tokens);
    }
    ++endpoint.ended[state];
    changed_locked(*job);
    record = job->rec;
  }
  co_await persist(record);
  if (unused) {
    // Admitted but never run (cancelled while queued, or no deployment left):
    // its usage row, with no tokens, and its reservation released.
    gw_.quotas.settle(*unused, 0, metering::now_ms());
    metering::UsageEvent usage;
    usage.ts = record.created_at;
    usage.route = "/v2/run";
    usage.model = job->request.model;
    usage.user_id = record.user_id;
    usage.key_id = record.key_id;
    usage.status = state == JobState::cancelled ? 499 : 503;
    usage.counted = true;
    if (!gw_.usage->enqueue(std::move(usage))) gw_.metrics.metering_rows_dropped.inc();
  }
  auto& m = gw_.metrics;
  m.jobs.labels({record.endpoint, metering::job_state_name(state)}).inc();
  if (record.started_at) {
    m.job_execution.labels({record.endpoint})
        .observe(static_cast<double>(record.finished_at - record.started_at) / 1e3);
  }
  if (!record.webhook.empty()) {
    JobSnapshot snapshot{record, record.output, {}};
    std::string body = job_status_body(snapshot);
    net::co_spawn(executor_, announce(record.webhook, record.id, std::move(body)), net::detached);
  }
  pump();
}

awaitable<void> JobManager::announce(std::string url, std::string id, std::string body) {
  const auto& w = gw_.config.jobs.webhook;
  WebhookPolicy policy;
  policy.timeout = w.timeout;
  policy.max_attempts = w.max_attempts;
  policy.first_backoff = w.first_backoff;
  policy.allow_private = w.allow_private;
  policy.allow_hosts = w.allow_hosts;
  policy.secret = w.secret;
  auto result = co_await deliver_webhook(std::move(url), std::move(id), std::move(body), std::move(policy));
  gw_.metrics.webhooks.labels({result.delivered ? "delivered" : "failed"}).inc();
}

#pragma GCC diagnostic pop

}  // namespace tollgate::gateway
