#include "gateway/jobs.hpp"

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>
#include <iostream>

#include "gateway/gateway_state.hpp"
#include "gateway/job_state.hpp"
#include "gateway/job_writer.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace json = boost::json;
using net::awaitable;
using metering::JobState;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

// Finished jobs kept in memory for /status and /stream; older ones are read from the store.
constexpr std::size_t kFinishedInMemory = 10'000;

}  // namespace

std::string job_status_body(const JobSnapshot& job) {
  const auto& r = job.record;
  json::object out{{"id", r.id}, {"status", metering::job_state_name(r.state)}};
  if (r.started_at) out["delayTime"] = r.started_at - r.created_at;
  if (r.started_at && r.finished_at) out["executionTime"] = r.finished_at - r.started_at;
  if (!job.output_json.empty()) out["output"] = json::parse(job.output_json);
  if (!r.error.empty()) out["error"] = r.error;
  return json::serialize(out);
}

// --- The manager -----------------------------------------------------------

JobManager::JobManager(Gateway& gw, net::any_io_executor executor)
    : gw_(gw),
      executor_(std::move(executor)),
      writer_(std::make_unique<JobWriter>(*gw.admin_store)),
      alive_(std::make_shared<bool>(true)) {
  for (const auto& e : gw_.config.jobs.endpoints) endpoints_[e.name];
}

JobManager::~JobManager() = default;

const JobEndpointConfig* JobManager::endpoint(std::string_view name) const {
  for (const auto& e : gw_.config.jobs.endpoints) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

std::size_t JobManager::running() const {
  std::lock_guard lock(mutex_);
  return running_total_;
}

void JobManager::count_active_locked(const Job& job, int delta) {
  if (job.rec.state != JobState::in_queue && job.rec.state != JobState::in_progress) return;
  gw_.metrics.jobs_active.labels({job.rec.endpoint, metering::job_state_name(job.rec.state)}).add(delta);
}

void JobManager::changed_locked(Job& job) {
  ++job.version;
  for (auto& weak : job.waiters) {
    if (auto timer = weak.lock()) {
      net::post(timer->get_executor(), [timer] { timer->cancel(); });
    }
  }
  job.waiters.clear();
}

void JobManager::enqueue_locked(const std::shared_ptr<Job>& job) {
  endpoints_[job->rec.endpoint].queue.push_back(job);
  count_active_locked(*job, 1);
}

void JobManager::recover() {
  auto records = gw_.admin_store->unfinished_jobs();
  const auto now = metering::now_ms();
  std::map<std::int64_t, std::string> user_names;
  if (!records.empty()) {
    for (const auto& u : gw_.admin_store->list_users()) user_names[u.id] = u.name;
  }
  for (auto& rec : records) {
    const auto* config = endpoint(rec.endpoint);
    std::string problem;
    std::optional<JobSpec> spec;
    if (!config) {
      problem = "the endpoint is no longer configured";
    } else {
      auto parsed = parse_job_body(rec.request, *config);
      if (auto* e = std::get_if<ApiError>(&parsed)) {
        problem = "the job no longer fits its endpoint: " + e->message;
      } else {
        spec = std::move(std::get<JobSpec>(parsed));
      }
    }
    if (problem.empty() && rec.state == JobState::in_progress && !config->requeue_interrupted) {
      problem = "the gateway stopped while the job ran";
    }
    if (!problem.empty()) {
      rec.state = JobState::failed;
      rec.error = problem;
      rec.finished_at = now;
      rec.expires_at = now + rec.ttl_ms;
      gw_.admin_store->update_job(rec);
      gw_.metrics.jobs.labels({rec.endpoint, "FAILED"}).inc();
      continue;
    }
    auto job = std::make_shared<Job>();
    job->endpoint = config;
    job->request = std::move(spec->request);
    job->request.user = user_names[rec.user_id];
    // The admission made before the restart is gone with its counters; the
    // job's usage row still counts its request and tokens.
    metering::Admission admission;
    admission.allowed = true;
    admission.user_id = rec.user_id;
    admission.key_id = rec.key_id;
    admission.admitted_at = now;
    job->admission = admission;
    if (rec.state == JobState::in_progress) {
      rec.state = JobState::in_queue;
      rec.started_at = 0;
      gw_.admin_store->update_job(rec);
    }
    job->rec = std::move(rec);
    std::lock_guard lock(mutex_);
    enqueue_locked(job);
    jobs_.emplace(job->rec.id, job);
  }
  net::co_spawn(executor_, purge_loop(), net::detached);
  pump();
}

void JobManager::release() {
  std::lock_guard lock(mutex_);
  for (auto& [name, state] : endpoints_) state.queue.clear();
  for (auto& [id, job] : jobs_) job->run.reset();
  jobs_.clear();
}

void JobManager::stop_starting() {
  std::lock_guard lock(mutex_);
  starting_stopped_ = true;
}

void JobManager::cut_off() {
  std::lock_guard lock(mutex_);
  cut_off_ = true;
  for (auto& [id, job] : jobs_) {
    if (!job->run) continue;
    auto run = job->run;
    run->shut_down = true;
    run->stop = true;
    net::post(executor_, [run] { run->deadline.cancel(); });
  }
}

void JobManager::pump() {
  std::vector<std::shared_ptr<Job>> starting;
  {
    std::lock_guard lock(mutex_);
    if (starting_stopped_) return;
    for (auto& [name, state] : endpoints_) {
      const auto* config = endpoint(name);
      if (!config) continue;
      while (state.running < config->max_concurrency && !state.queue.empty()) {
        auto job = state.queue.front();
        state.queue.erase(state.queue.begin());
        count_active_locked(*job, -1);
        job->running = true;
        job->rec.state = JobState::in_progress;
        job->rec.started_at = metering::now_ms();
        job->rec.attempts += 1;
        job->run = std::make_shared<Run>(executor_);
        job->run->deadline.expires_after(std::chrono::milliseconds(job->rec.execution_timeout_ms));
        count_active_locked(*job, 1);
        changed_locked(*job);
        ++state.running;
        ++running_total_;
        starting.push_back(std::move(job));
      }
    }
  }
  for (auto& job : starting) {
    net::co_spawn(executor_, run(std::move(job)), [](std::exception_ptr e) {
      if (!e) return;
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        std::cerr << "tollgate: a job failed unexpectedly: " << ex.what() << "\n";
      }
    });
  }
}

awaitable<void> JobManager::purge_loop() {
  std::weak_ptr<bool> alive = alive_;
  net::steady_timer timer(executor_);
  for (;;) {
    timer.expires_after(gw_.config.jobs.purge_interval);
    auto [ec] = co_await timer.async_wait(as_tuple);
    if (ec || alive.expired()) co_return;
    const auto now = metering::now_ms();
    {
      std::lock_guard lock(mutex_);
      std::vector<std::pair<metering::EpochMs, std::string>> finished;
      for (auto it = jobs_.begin(); it != jobs_.end();) {
        const auto& rec = it->second->rec;
        if (metering::job_state_final(rec.state) && rec.expires_at <= now) {
          it = jobs_.erase(it);
          continue;
        }
        if (metering::job_state_final(rec.state)) finished.emplace_back(rec.finished_at, it->first);
        ++it;
      }
      if (finished.size() > kFinishedInMemory) {
        std::sort(finished.begin(), finished.end());
        for (std::size_t i = 0; i + kFinishedInMemory < finished.size(); ++i) jobs_.erase(finished[i].second);
      }
    }
    try {
      auto purge = [this, now] { return gw_.admin_store->purge_jobs(now); };
      co_await run_blocking(gw_, std::move(purge));
    } catch (const std::exception& e) {
      std::cerr << "tollgate: purging expired jobs failed: " << e.what() << "\n";
    }
  }
}

awaitable<std::variant<std::string, ApiError>> JobManager::submit(Submission s) {
  auto job = std::make_shared<Job>();
  auto& rec = job->rec;
  rec.id = new_job_id();
  rec.endpoint = s.endpoint->name;
  rec.user_id = s.caller->key.user_id;
  rec.key_id = s.caller->key.id;
  rec.state = JobState::in_queue;
  rec.request = std::move(s.body);
  rec.webhook = s.spec.webhook;
  rec.created_at = metering::now_ms();
  rec.execution_timeout_ms = s.spec.execution_timeout.count();
  rec.ttl_ms = s.spec.ttl.count();
  job->endpoint = s.endpoint;
  job->request = std::move(s.spec.request);
  job->prompt_estimate = s.prompt_estimate;
  job->admission = s.admission;
  {
    std::lock_guard lock(mutex_);
    if (starting_stopped_) co_return ApiError{503, "the gateway is shutting down", "server_error", {}, "shutting_down", 1};
    if (endpoints_[rec.endpoint].queue.size() >= s.endpoint->max_queue) {
      co_return rate_limited("the endpoint '" + rec.endpoint + "' has " + std::to_string(s.endpoint->max_queue) +
                                 " jobs waiting; try again later",
                             1);
    }
  }
  // On disk before anyone hears of it: an accepted job survives kill -9.
  if (!co_await persist(rec, true)) {
    co_return ApiError{503, "the job could not be stored; try again", "server_error", {}, "store_unavailable", 1};
  }
  std::string id = rec.id;
  {
    std::lock_guard lock(mutex_);
    jobs_.emplace(id, job);
    enqueue_locked(job);
  }
  gw_.metrics.jobs.labels({job->rec.endpoint, "IN_QUEUE"}).inc();
  pump();
  co_return id;
}

JobSnapshot JobManager::snapshot_locked(Job& job, bool take_stream) {
  JobSnapshot s;
  s.record = job.rec;
  if (job.rec.state == JobState::completed) s.output_json = job.rec.output;
  if (!take_stream) return s;
  for (; job.streamed < job.pieces.size(); ++job.streamed) {
    s.stream_items.push_back(json::serialize(json::object{{"output", json::object{{"text", job.pieces[job.streamed]}}}}));
  }
  if (job.rec.state == JobState::completed && !job.end_streamed) {
    json::object usage{{"prompt_tokens", job.prompt_tokens},
                       {"completion_tokens", job.completion_tokens},
                       {"total_tokens", job.prompt_tokens + job.completion_tokens}};
    json::object last{{"text", ""}, {"usage", std::move(usage)}};
    last["finish_reason"] = job.finish_reason.empty() ? json::value(nullptr) : json::value(job.finish_reason);
    s.stream_items.push_back(json::serialize(json::object{{"output", std::move(last)}}));
    job.end_streamed = true;
  }
  return s;
}

awaitable<std::optional<JobSnapshot>> JobManager::find(std::string_view endpoint, std::string_view id,
                                                       std::int64_t user_id, bool take_stream) {
  if (!plausible_job_id(id)) co_return std::nullopt;
  const auto now = metering::now_ms();
  {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it != jobs_.end()) {
      auto& job = *it->second;
      if (job.rec.user_id != user_id || job.rec.endpoint != endpoint) co_return std::nullopt;
      if (metering::job_state_final(job.rec.state) && job.rec.expires_at <= now) co_return std::nullopt;
      co_return snapshot_locked(job, take_stream);
    }
  }
  // Finished long ago (or before a restart): the store has it until it expires.
  auto lookup = [this, key = std::string(id)] { return gw_.admin_store->find_job(key); };
  auto stored = co_await run_blocking(gw_, std::move(lookup));
  if (!stored || stored->user_id != user_id || stored->endpoint != endpoint) co_return std::nullopt;
  if (!metering::job_state_final(stored->state) || stored->expires_at <= now) co_return std::nullopt;
  auto job = std::make_shared<Job>();
  job->rec = std::move(*stored);
  job->endpoint = this->endpoint(job->rec.endpoint);
  if (!job->rec.output.empty()) {
    boost::system::error_code ec;
    auto out = json::parse(job->rec.output, ec);
    if (!ec && out.is_object()) {
      const auto& o = out.as_object();
      if (const auto* t = o.if_contains("text"); t && t->is_string() && !t->as_string().empty()) {
        job->pieces.emplace_back(t->as_string());
      }
      if (const auto* f = o.if_contains("finish_reason"); f && f->is_string()) job->finish_reason = f->as_string();
      if (const auto* u = o.if_contains("usage"); u && u->is_object()) {
        job->prompt_tokens = json_int_or_zero(u->as_object().if_contains("prompt_tokens"));
        job->completion_tokens = json_int_or_zero(u->as_object().if_contains("completion_tokens"));
      }
    }
  }
  std::lock_guard lock(mutex_);
  auto [it, inserted] = jobs_.emplace(job->rec.id, job);
  co_return snapshot_locked(*it->second, take_stream);
}

std::uint64_t JobManager::version(std::string_view id) const {
  std::lock_guard lock(mutex_);
  auto it = jobs_.find(id);
  return it == jobs_.end() ? 0 : it->second->version;
}

awaitable<void> JobManager::wait_for_change(std::string_view id, std::uint64_t seen_version,
                                            SteadyClock::time_point deadline) {
  auto timer = std::make_shared<net::steady_timer>(co_await net::this_coro::executor, deadline);
  {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->version != seen_version) co_return;
    it->second->waiters.push_back(timer);
  }
  co_await timer->async_wait(as_tuple);
}

awaitable<std::optional<JobSnapshot>> JobManager::cancel(std::string_view endpoint, std::string_view id,
                                                         std::int64_t user_id) {
  auto found = co_await find(endpoint, id, user_id);
  if (!found) co_return std::nullopt;
  std::shared_ptr<Job> queued;
  {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) co_return found;
    auto job = it->second;
    if (job->rec.state == JobState::in_queue) {
      auto& q = endpoints_[job->rec.endpoint].queue;
      std::erase(q, job);
      queued = job;
    } else if (job->run) {
      auto run = job->run;
      run->cancelled = true;
      run->stop = true;
      net::post(executor_, [run] { run->deadline.cancel(); });
    }
  }
  if (queued) {
    std::string no_error;
    co_await finish(queued, JobState::cancelled, std::move(no_error));
  } else {
    // A running job ends as soon as its backend stops: wait a moment to report that.
    auto deadline = SteadyClock::now() + std::chrono::seconds(5);
    for (int i = 0; i < 100 && SteadyClock::now() < deadline; ++i) {
      auto v = version(id);
      auto now_state = co_await find(endpoint, id, user_id);
      if (!now_state || metering::job_state_final(now_state->record.state)) co_return now_state;
      co_await wait_for_change(id, v, deadline);
    }
  }
  co_return co_await find(endpoint, id, user_id);
}

awaitable<std::variant<JobSnapshot, ApiError>> JobManager::retry(std::string_view endpoint, std::string_view id,
                                                                 std::shared_ptr<const KeyEntry> caller,
                                                                 const metering::Admission& admission) {
  auto found = co_await find(endpoint, id, caller->key.user_id);
  if (!found) co_return not_found("no job '" + metering::excerpt(id) + "' on this endpoint", "job_not_found");
  metering::JobRecord record;
  {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) co_return not_found("no job '" + metering::excerpt(id) + "' on this endpoint", "job_not_found");
    auto& job = *it->second;
    if (job.rec.state != JobState::failed && job.rec.state != JobState::timed_out) {
      co_return bad_request("only a FAILED or TIMED_OUT job can be retried; this one is " +
                                std::string(metering::job_state_name(job.rec.state)),
                            std::nullopt, "job_not_retryable");
    }
    if (!job.endpoint || job.request.model.empty()) {
      // Loaded from the store after a restart: its request is read again.
      auto parsed = job.endpoint ? parse_job_body(job.rec.request, *job.endpoint)
                                 : std::variant<JobSpec, ApiError>(bad_request("the endpoint is gone"));
      if (auto* e = std::get_if<ApiError>(&parsed)) {
        co_return bad_request("the job cannot run again: " + e->message, std::nullopt, "job_not_retryable");
      }
      job.request = std::move(std::get<JobSpec>(parsed).request);
    }
    if (starting_stopped_) co_return ApiError{503, "the gateway is shutting down", "server_error", {}, "shutting_down", 1};
    job.request.user = caller->key.user_name;
    job.admission = admission;
    job.rec.state = JobState::in_queue;
    job.rec.error.clear();
    job.rec.output.clear();
    job.rec.started_at = 0;
    job.rec.finished_at = 0;
    job.rec.created_at = metering::now_ms();
    job.rec.expires_at = 0;
    job.pieces.clear();
    job.streamed = 0;
    job.end_streamed = false;
    job.finish_reason.clear();
    job.prompt_tokens = job.completion_tokens = 0;
    enqueue_locked(it->second);
    changed_locked(job);
    record = job.rec;
  }
  co_await persist(record);
  gw_.metrics.jobs.labels({record.endpoint, "IN_QUEUE"}).inc();
  pump();
  auto now = co_await find(endpoint, id, caller->key.user_id);
  if (!now) co_return not_found("no job '" + metering::excerpt(id) + "' on this endpoint", "job_not_found");
  co_return *now;
}

awaitable<std::size_t> JobManager::purge_queue(std::string_view endpoint, std::int64_t user_id) {
  std::vector<std::shared_ptr<Job>> removed;
  {
    std::lock_guard lock(mutex_);
    auto it = endpoints_.find(endpoint);
    if (it == endpoints_.end()) co_return 0;
    auto& q = it->second.queue;
    for (auto j = q.begin(); j != q.end();) {
      if ((*j)->rec.user_id == user_id) {
        removed.push_back(*j);
        j = q.erase(j);
      } else {
        ++j;
      }
    }
  }
  for (auto& job : removed) {
    std::string why = "removed by purge-queue";
    co_await finish(job, JobState::cancelled, std::move(why));
  }
  co_return removed.size();
}

std::string JobManager::health_body(std::string_view endpoint) const {
  std::lock_guard lock(mutex_);
  auto it = endpoints_.find(endpoint);
  const auto* config = this->endpoint(endpoint);
  json::object jobs;
  json::object workers;
  if (it != endpoints_.end() && config) {
    const auto& s = it->second;
    auto ended = [&](JobState state) {
      auto e = s.ended.find(state);
      return e == s.ended.end() ? std::int64_t{0} : e->second;
    };
    jobs = {{"inQueue", s.queue.size()},
            {"inProgress", s.running},
            {"completed", ended(JobState::completed)},
            {"failed", ended(JobState::failed)},
            {"cancelled", ended(JobState::cancelled)},
            {"timedOut", ended(JobState::timed_out)}};
    workers = {{"running", s.running}, {"idle", config->max_concurrency - s.running}};
  }
  return json::serialize(json::object{{"jobs", std::move(jobs)}, {"workers", std::move(workers)}});
}

}  // namespace tollgate::gateway
