// The job API's HTTP side: /v2/{endpoint}/run, runsync, status/{id},
// stream/{id}, cancel/{id}, retry/{id}, purge-queue and health. The jobs
// themselves live in gateway/jobs.*.
#include <boost/json.hpp>
#include <charconv>

#include "gateway/completion_flow.hpp"
#include "gateway/http_rules.hpp"
#include "gateway/jobs.hpp"
#include "gateway/session.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace http = boost::beast::http;
namespace json = boost::json;
using boost::asio::awaitable;
using SteadyClock = std::chrono::steady_clock;

// "/v2/{endpoint}/{op}[/{id}]" split at '/': at most four parts are looked at.
std::vector<std::string_view> path_parts(std::string_view path) {
  std::vector<std::string_view> parts;
  while (!path.empty() && parts.size() < 5) {
    if (path.front() == '/') path.remove_prefix(1);
    auto end = path.find('/');
    parts.push_back(path.substr(0, end));
    path = end == std::string_view::npos ? std::string_view() : path.substr(end);
  }
  return parts;
}

// ?wait=MS on /runsync, bounded by the configured maximum.
std::chrono::milliseconds runsync_wait(std::string_view target, std::chrono::milliseconds max) {
  auto q = target.find('?');
  if (q == std::string_view::npos) return max;
  auto query = target.substr(q + 1);
  for (std::size_t pos = 0; pos <= query.size();) {
    auto end = query.find('&', pos);
    if (end == std::string_view::npos) end = query.size();
    auto item = query.substr(pos, end - pos);
    if (item.starts_with("wait=")) {
      std::int64_t ms = 0;
      auto digits = item.substr(5);
      auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), ms);
      if (ec == std::errc() && p == digits.data() + digits.size() && ms >= 0) {
        return std::min(max, std::chrono::milliseconds(ms));
      }
    }
    pos = end + 1;
  }
  return max;
}

std::string purge_body(std::size_t removed) {
  return json::serialize(json::object{{"removed", removed}, {"status", "completed"}});
}

std::string queued_body(const std::string& id) {
  return json::serialize(json::object{{"id", id}, {"status", "IN_QUEUE"}});
}

ApiError no_job(std::string_view id) {
  return not_found("no job '" + metering::excerpt(id) + "' on this endpoint", "job_not_found");
}

}  // namespace

// g++ 12 sees Asio's frame allocator (aligned_alloc, freed by the frame's own
// operator delete) through enough inlining in these handlers to call it a
// mismatch: the known coroutine-frame false positive (see completion_flow.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

awaitable<bool> Session::write_json(const Request& req, Exchange& x, std::string body) {
  auto res = make_response(req, http::status::ok, std::move(body));
  x.finish(200);
  co_return co_await write(std::move(res));
}

awaitable<bool> Session::handle_jobs(const Request& req, Exchange& x) {
  auto parts = path_parts(target_path(req.target()));  // "v2", endpoint, op, id
  const std::string_view name = parts.size() > 1 ? parts[1] : std::string_view();
  const std::string_view op = parts.size() > 2 ? parts[2] : std::string_view();
  const std::string_view id = parts.size() > 3 ? parts[3] : std::string_view();
  const JobEndpointConfig* endpoint = gw_.jobs->endpoint(name);
  if (!endpoint) {
    auto unknown = not_found("no job endpoint '" + metering::excerpt(name) + "'", "endpoint_not_found");
    co_return co_await respond_error(req, x, unknown);
  }
  const bool with_id = op == "status" || op == "stream" || op == "cancel" || op == "retry";
  const bool known = with_id || op == "run" || op == "runsync" || op == "purge-queue" || op == "health";
  if (!known || parts.size() != (with_id ? 4u : 3u)) {
    auto no_route = not_found("no route for " + metering::excerpt(req.target()), "unknown_route");
    co_return co_await respond_error(req, x, no_route);
  }
  const bool reads = op == "status" || op == "stream" || op == "health";
  if (req.method() != http::verb::post && !(reads && req.method() == http::verb::get)) {
    ApiError wrong_method{405,
                          std::string(reads ? "use GET or POST" : "use POST"),
                          "invalid_request_error",
                          std::nullopt,
                          "method_not_allowed",
                          {}};
    co_return co_await respond_error(req, x, wrong_method);
  }
  x.event.model = endpoint->model;
  if (!x.caller->key.allows_model(endpoint->model)) {
    gw_.metrics.auth_failures.labels({"model_not_allowed"}).inc();
    auto refusal = forbidden("this API key may not use the model '" + metering::excerpt(endpoint->model) + "'");
    co_return co_await respond_error(req, x, refusal);
  }
  if (op == "run" || op == "runsync") co_return co_await submit_job(req, x, *endpoint, op == "runsync");

  const auto user = x.caller->key.user_id;
  if (op == "retry") {
    // A retry is a new run: admitted like one, metered when it ends.
    if (auto refused = co_await admit(x, gw_.config.metering.default_reserve_tokens)) {
      co_return co_await respond_error(req, x, *refused);
    }
    auto retried = co_await gw_.jobs->retry(endpoint->name, id, x.caller, *x.admission);
    if (auto* e = std::get_if<ApiError>(&retried)) co_return co_await respond_error(req, x, *e);
    x.metered = false;  // the job's own row counts it
    x.admission.reset();
    std::string body = job_status_body(std::get<JobSnapshot>(retried));
    co_return co_await write_json(req, x, std::move(body));
  }
  // Looking at jobs is free: only runs are metered and counted.
  x.metered = false;
  if (op == "health") {
    std::string body = gw_.jobs->health_body(endpoint->name);
    co_return co_await write_json(req, x, std::move(body));
  }
  if (op == "purge-queue") {
    auto removed = co_await gw_.jobs->purge_queue(endpoint->name, user);
    std::string body = purge_body(removed);
    co_return co_await write_json(req, x, std::move(body));
  }
  if (op == "cancel") {
    auto job = co_await gw_.jobs->cancel(endpoint->name, id, user);
    if (!job) {
      auto missing = no_job(id);
      co_return co_await respond_error(req, x, missing);
    }
    std::string body = job_status_body(*job);
    co_return co_await write_json(req, x, std::move(body));
  }
  if (op == "status") {
    auto job = co_await gw_.jobs->find(endpoint->name, id, user);
    if (!job) {
      auto missing = no_job(id);
      co_return co_await respond_error(req, x, missing);
    }
    std::string body = job_status_body(*job);
    co_return co_await write_json(req, x, std::move(body));
  }
  // stream: what the job produced since the last call, waiting a moment for more.
  const auto deadline = SteadyClock::now() + gw_.config.jobs.stream_wait;
  std::optional<JobSnapshot> job;
  for (int i = 0; i < 1000; ++i) {
    auto seen = gw_.jobs->version(id);
    job = co_await gw_.jobs->find(endpoint->name, id, user, true);
    if (!job || !job->stream_items.empty() || metering::job_state_final(job->record.state) ||
        SteadyClock::now() >= deadline) {
      break;
    }
    co_await gw_.jobs->wait_for_change(id, seen, deadline);
  }
  if (!job) {
    auto missing = no_job(id);
    co_return co_await respond_error(req, x, missing);
  }
  json::array items;
  for (const auto& item : job->stream_items) items.push_back(json::parse(item));
  json::object body;
  body["id"] = job->record.id;
  body["status"] = metering::job_state_name(job->record.state);
  body["stream"] = std::move(items);
  if (!job->record.error.empty()) body["error"] = job->record.error;
  std::string text = json::serialize(body);
  co_return co_await write_json(req, x, std::move(text));
}

awaitable<bool> Session::submit_job(const Request& req, Exchange& x, const JobEndpointConfig& endpoint, bool sync) {
  auto parsed = parse_job_body(req.body(), endpoint);
  if (auto* e = std::get_if<ApiError>(&parsed)) {
    // Like every call from a known key, a bad one counts against its limits.
    if (auto refused = co_await admit(x, 0)) {
      co_return co_await respond_error(req, x, *refused);
    }
    co_return co_await respond_error(req, x, *e);
  }
  auto& spec = std::get<JobSpec>(parsed);
  auto plan = gw_.router.plan(endpoint.model);
  const bool chat = spec.request.chat();
  std::erase_if(plan, [&](const backends::Deployment* d) {
    auto caps = d->backend->capabilities();
    return chat ? !caps.chat : !caps.completions;
  });
  std::int64_t prompt_estimate = 0;
  if (!plan.empty()) {
    prompt_estimate = co_await prepare_prompt(*plan.front()->backend, spec.request, &gw_.prepare_pool);
  }
  const std::int64_t reserve =
      plan.empty() ? 0 : prompt_estimate + spec.request.max_tokens.value_or(gw_.config.metering.default_reserve_tokens);
  if (auto refused = co_await admit(x, reserve)) {
    co_return co_await respond_error(req, x, *refused);
  }
  if (plan.empty()) {
    auto refusal = bad_request("the model '" + metering::excerpt(endpoint.model) + "' does not serve " +
                                   std::string(chat ? "messages" : "prompts"),
                               "input");
    co_return co_await respond_error(req, x, refusal);
  }
  spec.request.user = x.caller->key.user_name;
  JobManager::Submission submission{&endpoint, std::move(spec), req.body(), x.caller, *x.admission, prompt_estimate};
  auto submitted = co_await gw_.jobs->submit(std::move(submission));
  if (auto* e = std::get_if<ApiError>(&submitted)) co_return co_await respond_error(req, x, *e);
  const auto rate_status = x.admission->status;
  // The job carries the admission now; its usage row is written when it ends.
  x.metered = false;
  x.admission.reset();
  const auto& id = std::get<std::string>(submitted);

  std::optional<JobSnapshot> job;
  if (sync) {
    const auto deadline = SteadyClock::now() + runsync_wait(req.target(), gw_.config.jobs.runsync_wait);
    for (int i = 0; i < 100'000; ++i) {
      auto seen = gw_.jobs->version(id);
      job = co_await gw_.jobs->find(endpoint.name, id, x.caller->key.user_id);
      if (!job || metering::job_state_final(job->record.state) || SteadyClock::now() >= deadline) break;
      co_await gw_.jobs->wait_for_change(id, seen, deadline);
    }
  }
  std::string body = job ? job_status_body(*job) : queued_body(id);
  auto res = make_response(req, http::status::ok, std::move(body));
  set_rate_limit_headers(res, rate_status);
  x.finish(200);
  co_return co_await write(std::move(res));
}

#pragma GCC diagnostic pop

}  // namespace tollgate::gateway
