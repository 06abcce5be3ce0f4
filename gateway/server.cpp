#include "gateway/server.hpp"

#include <sys/socket.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <cerrno>
#include <deque>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <list>
#include <mutex>
#include <thread>

#include "backends/echo.hpp"
#include "backends/http_upstream.hpp"
#include "backends/local.hpp"
#include "backends/openai_compatible.hpp"
#include "backends/router.hpp"
#include "gateway/admin.hpp"
#include "gateway/auth.hpp"
#include "gateway/completion_request.hpp"
#include "gateway/completion_response.hpp"
#include "gateway/gateway_metrics.hpp"
#include "gateway/http_error.hpp"
#include "gateway/http_rules.hpp"
#include "metering/quota.hpp"
#include "metering/text_bounds.hpp"
#include "metering/usage_writer.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = net::ip::tcp;
using net::awaitable;
using net::use_awaitable;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(use_awaitable);

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// Bodies up to this size are read even when the request is refused before
// needing them, to keep the connection.
constexpr std::uint64_t kDrainableBody = 64 * 1024;

double seconds_since(SteadyClock::time_point t) {
  return std::chrono::duration<double>(SteadyClock::now() - t).count();
}
std::int64_t micros_since(SteadyClock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - t).count();
}

// A connection the shutdown can reach: idle ones are closed at once, busy ones
// finish their request first.
class SessionSink;

struct Connection {
  explicit Connection(tcp::socket socket) : stream(std::move(socket)) {}
  beast::tcp_stream stream;
  std::atomic<bool> idle{true};
  // The completion being relayed, if any; touched on the connection's executor only.
  std::weak_ptr<SessionSink> sink;
};

// What one process serves: configuration, routing, keys, quotas, metering.
struct Gateway {
  Config config;
  GatewayMetrics metrics;
  backends::Router router;
  std::unique_ptr<KeyCache> keys;
  AdminKey admin_key;
  std::unique_ptr<metering::Store> admin_store;  // blocking: used on admin_pool only
  net::thread_pool admin_pool{1};
  metering::QuotaLimiter quotas;
  std::unique_ptr<metering::UsageWriter> usage;
  std::atomic<bool> stopping{false};
  std::atomic<bool> cut_off{false};            // the shutdown grace has run out: no more fallbacks
  std::unique_ptr<backends::AppUpstream> app;  // set when app_upstream is configured
  std::vector<net::ip::address> trusted_proxies;
  std::atomic<std::size_t> open_connections{0};

  std::mutex connections_mutex;
  std::list<std::weak_ptr<Connection>> connections;
  std::string all_models_body;  // /v1/models for a key that may use every model

  explicit Gateway(const Config& c) : config(c), metrics(c.metering.per_user_metrics) {}
};

// The /v1/models answer: every routed model, or those in `allowed` when it is not empty.
std::string model_list_body(const backends::Router& router, const std::vector<std::string>& allowed) {
  json::array data;
  for (const auto& route : router.routes()) {
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), route.model) == allowed.end()) continue;
    data.push_back(json::object{{"id", route.model}, {"object", "model"}, {"created", 0}, {"owned_by", "tollgate"}});
  }
  return json::serialize(json::object{{"object", "list"}, {"data", std::move(data)}});
}

// Coroutines take their state as parameters, never as lambda captures: g++ 12
// destroys a capturing coroutine lambda's captures twice.
template <class F>
awaitable<std::invoke_result_t<F>> invoke(F f) {
  co_return f();
}

// Runs `f` on the admin pool (SQLite may block) and resumes on the caller's executor.
template <class F>
awaitable<std::invoke_result_t<F>> run_blocking(Gateway& gw, F f) {
  co_return co_await net::co_spawn(gw.admin_pool, invoke(std::move(f)), use_awaitable);
}

// Calls set(name, value) for each x-ratelimit-* header `status` calls for.
template <class Set>
void for_each_rate_limit_header(const metering::RateLimitStatus& status, Set&& set) {
  if (status.requests) {
    set("x-ratelimit-limit-requests", std::to_string(status.requests->limit));
    set("x-ratelimit-remaining-requests", std::to_string(status.requests->remaining));
    set("x-ratelimit-reset-requests", metering::format_reset(status.requests->reset_ms));
  }
  if (status.tokens) {
    set("x-ratelimit-limit-tokens", std::to_string(status.tokens->limit));
    set("x-ratelimit-remaining-tokens", std::to_string(status.tokens->remaining));
    set("x-ratelimit-reset-tokens", metering::format_reset(status.tokens->reset_ms));
  }
}

void set_rate_limit_headers(http::fields& res, const metering::RateLimitStatus& status) {
  for_each_rate_limit_header(status, [&res](std::string_view name, std::string_view value) { res.set(name, value); });
}

Response make_response(const Request& req, http::status status, std::string body,
                       std::string_view content_type = "application/json") {
  Response res{status, req.version()};
  res.set(http::field::server, "tollgate");
  res.set(http::field::content_type, content_type);
  res.keep_alive(req.keep_alive());
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

Response error_response(const Request& req, const ApiError& e) {
  auto res = make_response(req, static_cast<http::status>(e.status), e.body());
  if (e.retry_after_s) res.set(http::field::retry_after, std::to_string(*e.retry_after_s));
  return res;
}

// Paths the gateway answers itself; with an app upstream, every other path goes there.
bool gateway_owns(std::string_view path) {
  return path == "/v1/chat/completions" || path == "/v1/completions" || path == "/v1/embeddings" ||
         path == "/v1/models" || path == "/healthz" || path == "/readyz" || path == "/metrics" || path == "/admin" ||
         path.starts_with("/admin/");
}

// The usage row keeps an app call's path; a client cannot make rows arbitrarily big.
constexpr std::size_t kMaxMeteredPath = 512;

// Failures another deployment might not have: worth a fallback, and counted
// against the deployment's health.
bool retryable(backends::ErrorKind kind) {
  using backends::ErrorKind;
  return kind == ErrorKind::upstream_failed || kind == ErrorKind::timeout || kind == ErrorKind::rate_limited ||
         kind == ErrorKind::overloaded;
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

// One request's bookkeeping: metrics and the usage row, recorded once at the end.
struct Exchange {
  Gateway& gw;
  SteadyClock::time_point started = SteadyClock::now();
  metering::UsageEvent event;
  std::string_view route;
  bool metered = false;  // a usage row is written (the caller presented a known key)
  std::shared_ptr<const KeyEntry> caller;
  std::optional<metering::Admission> admission;
  std::chrono::microseconds backend_time{0};
  bool finished = false;

  Exchange(Gateway& g, std::string_view path) : gw(g), route(route_label(path)) {
    event.ts = metering::now_ms();
    event.route = std::string(route);
    gw.metrics.in_flight.add(1);
  }
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;

  void identify(std::shared_ptr<const KeyEntry> entry) {
    caller = std::move(entry);
    metered = true;
    event.user_id = caller->key.user_id;
    event.key_id = caller->key.id;
  }

  metering::QuotaSubject subject() const {
    return {caller->key.user_id, caller->key.id, caller->user_limits, caller->key.limits};
  }

  // A request that ends by an exception is still counted and metered.
  ~Exchange() {
    if (!finished) finish(500);
  }

  void finish(int status) {
    finished = true;
    auto& m = gw.metrics;
    m.in_flight.add(-1);
    double took = seconds_since(started);
    std::string status_text = std::to_string(status);
    m.requests.labels({route, status_text}).inc();
    m.request_duration.labels({route}).observe(took);
    m.gateway_overhead.observe(std::max(0.0, took - std::chrono::duration<double>(backend_time).count()));
    if (!event.model.empty() && (event.prompt_tokens || event.completion_tokens)) {
      m.tokens.labels({"prompt", event.model, event.backend}).inc(static_cast<double>(event.prompt_tokens));
      m.tokens.labels({"completion", event.model, event.backend}).inc(static_cast<double>(event.completion_tokens));
    }
    if (admission && !admission->allowed) {
      // The kind of limit keeps the label bounded; which user or key is in the message.
      m.quota_rejections.labels({admission->limit}).inc();
    }
    if (!metered) return;
    if (m.per_user) {
      const auto& user = caller->key.user_name;
      m.user_requests.labels({user}).inc();
      m.user_tokens.labels({user, "prompt"}).inc(static_cast<double>(event.prompt_tokens));
      m.user_tokens.labels({user, "completion"}).inc(static_cast<double>(event.completion_tokens));
    }
    if (admission && admission->allowed) {
      gw.quotas.settle(*admission, event.prompt_tokens + event.completion_tokens, metering::now_ms());
    }
    event.status = status;
    event.latency_us = micros_since(started);
    event.counted = admission && admission->allowed;
    if (!gw.usage->enqueue(std::move(event))) gw.metrics.metering_rows_dropped.inc();
  }
};

// Receives backend events on any thread and wakes the session coroutine.
class SessionSink final : public backends::CompletionSink {
 public:
  explicit SessionSink(net::any_io_executor ex) : signal_(ex, 1) {}

  void on_event(backends::CompletionEvent event) override {
    {
      std::lock_guard lock(mutex_);
      events_.push_back(std::move(event));
    }
    // A failed try_send means a wake-up is already pending: nothing is lost.
    signal_.try_send(boost::system::error_code{});
  }

  std::size_t pending() const override {
    std::lock_guard lock(mutex_);
    return events_.size();
  }

  awaitable<std::deque<backends::CompletionEvent>> next() {
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        if (!events_.empty()) co_return std::exchange(events_, {});
      }
      co_await signal_.async_receive(use_awaitable);
    }
  }

 private:
  mutable std::mutex mutex_;
  std::deque<backends::CompletionEvent> events_;
  net::experimental::concurrent_channel<void(boost::system::error_code)> signal_;
};

class Session {
 public:
  Session(Gateway& gw, std::shared_ptr<Connection> conn)
      : gw_(gw), conn_(std::move(conn)), deadline_(conn_->stream.get_executor(), conn_->stream.socket()) {}

  awaitable<void> run();

  // The backend's next events. For an answer that is not streamed, the client
  // is watched meanwhile, so one that hangs up cancels the work at once
  // (nullopt) instead of when the answer would be written; a streamed answer
  // notices at its next write.
  awaitable<std::optional<std::deque<backends::CompletionEvent>>> next_events(SessionSink& sink, bool watch_client,
                                                                              bool& client_pipelined) {
    if (!watch_client || client_pipelined) co_return co_await sink.next();
    using namespace net::experimental::awaitable_operators;
    auto& socket = stream().socket();
    for (;;) {
      auto first = co_await (sink.next() || socket.async_wait(tcp::socket::wait_read, as_tuple));
      if (first.index() == 0) co_return std::move(std::get<0>(first));
      // Readable: end of stream or an error means the client left; bytes are
      // a pipelined request, left in the socket for later.
      char byte;
      auto n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n > 0) {
        client_pipelined = true;
        co_return co_await sink.next();
      }
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) co_return std::nullopt;
    }
  }

 private:
  beast::tcp_stream& stream() { return conn_->stream; }
  const ServerLimits& limits() const { return gw_.config.limits; }

  awaitable<bool> write(Response res);
  awaitable<bool> read_body(http::request_parser<http::string_body>& parser, Exchange& x);
  awaitable<bool> handle(http::request_parser<http::string_body>& parser);
  awaitable<bool> respond_error(const Request& req, Exchange& x, const ApiError& e, bool close = false);
  awaitable<bool> refuse(http::request_parser<http::string_body>& parser, Exchange& x, ApiError error);
  awaitable<bool> handle_admin_route(http::request_parser<http::string_body>& parser, Exchange& x);
  awaitable<bool> handle_app(http::request_parser<http::string_body>& parser, Exchange& x, std::string_view path);
  void set_forwarding_headers(const Request& req, backends::AppForward& how);
  awaitable<bool> handle_models(const Request& req, Exchange& x);
  // Chat and text completions, and embeddings (forwarded whole to a remote backend).
  awaitable<bool> handle_completion(const Request& req, Exchange& x, bool chat, bool embeddings);
  awaitable<std::optional<ApiError>> authenticate(const Request& req, Exchange& x);

  Gateway& gw_;
  std::shared_ptr<Connection> conn_;
  // For reading requests, writing whole answers and the app proxy, which use
  // the socket directly; streamed answers use the stream's own expiry.
  backends::IoDeadline deadline_;
  beast::flat_buffer buffer_;
  bool close_after_ = false;              // the request's body was not read: framing is lost
  std::optional<net::ip::address> peer_;  // the client's address, looked up once
  std::string peer_text_;                 // and as text
};

// A string body is framed by hand in one buffer (see backends::response_head).
std::string wire_format(const Response& res) {
  std::string out = backends::response_head(res);
  out += res.body();
  return out;
}

awaitable<bool> Session::write(Response res) {
  if (close_after_ || gw_.stopping) res.keep_alive(false);
  bool keep = res.keep_alive();
  std::string wire = wire_format(res);
  deadline_.arm(limits().idle_timeout);
  auto [ec, n] = co_await net::async_write(stream().socket(), net::buffer(wire), as_tuple);
  deadline_.disarm();
  co_return !ec && keep;
}

awaitable<bool> Session::respond_error(const Request& req, Exchange& x, const ApiError& e, bool close) {
  if (close) close_after_ = true;
  auto res = error_response(req, e);
  if (x.caller)
    set_rate_limit_headers(res, x.admission ? x.admission->status : gw_.quotas.status(x.subject(), metering::now_ms()));
  x.finish(e.status);
  co_return co_await write(std::move(res));
}

awaitable<std::optional<ApiError>> Session::authenticate(const Request& req, Exchange& x) {
  auto key = presented_key(req[http::field::authorization], req["x-api-key"]);
  if (!key) {
    gw_.metrics.auth_failures.labels({"missing"}).inc();
    co_return unauthorized("missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'", "missing_api_key");
  }
  auto now = metering::now_ms();
  auto outcome = gw_.keys->authenticate(*key, now);
  if (outcome.status == AuthOutcome::Status::unknown) {
    // Perhaps a key created a moment ago: looked up again after a refresh,
    // off the io thread (the refresh reads SQLite). Refreshes are rate-limited:
    // the wait for the next one is spent here, on a timer, not on the pool.
    auto ticket = gw_.keys->miss_ticket();
    if (auto delay = gw_.keys->miss_delay(); delay > delay.zero()) {
      net::steady_timer timer(co_await net::this_coro::executor, delay);
      co_await timer.async_wait(as_tuple);
    }
    auto look_again = [keys = gw_.keys.get(), presented = std::string(*key), ticket, now] {
      return keys->authenticate_after_refresh(presented, ticket, now);
    };
    outcome = co_await run_blocking(gw_, std::move(look_again));
  }
  switch (outcome.status) {
    case AuthOutcome::Status::ok:
      x.identify(outcome.entry);
      co_return std::nullopt;
    case AuthOutcome::Status::revoked:
      x.identify(outcome.entry);
      gw_.metrics.auth_failures.labels({"revoked"}).inc();
      co_return unauthorized("this API key has been revoked", "revoked_api_key");
    case AuthOutcome::Status::expired:
      x.identify(outcome.entry);
      gw_.metrics.auth_failures.labels({"expired"}).inc();
      co_return unauthorized("this API key has expired", "expired_api_key");
    case AuthOutcome::Status::missing:
    case AuthOutcome::Status::unknown:
      break;
  }
  gw_.metrics.auth_failures.labels({"unknown"}).inc();
  co_return unauthorized("invalid API key");
}

awaitable<bool> Session::read_body(http::request_parser<http::string_body>& parser, Exchange& x) {
  auto& req = parser.get();
  if (parser.is_done()) co_return true;
  if (beast::iequals(req[http::field::expect], "100-continue")) {
    http::response<http::empty_body> cont{http::status::continue_, req.version()};
    stream().expires_after(limits().idle_timeout);
    auto [ec, n] = co_await http::async_write(stream(), cont, as_tuple);
    if (ec) co_return false;
  }
  stream().expires_after(limits().body_timeout);
  auto [ec, n] = co_await http::async_read(stream(), buffer_, parser, as_tuple);
  if (ec == http::error::body_limit) {
    // g++ 12 destroys a braced temporary inside a co_await twice: name it first.
    ApiError too_large{413,
                       "request body exceeds the limit of " + std::to_string(limits().max_body) + " bytes",
                       "invalid_request_error",
                       std::nullopt,
                       "request_too_large",
                       {}};
    co_await respond_error(req, x, too_large, true);
    co_return false;
  }
  if (ec) {
    // Timeout or a broken body: the connection's framing is lost, so it closes.
    if (ec != beast::error::timeout && ec != http::error::end_of_stream && ec != net::error::eof) {
      auto bad = bad_request("malformed request body: " + ec.message(), std::nullopt, "bad_body");
      co_await respond_error(req, x, bad, true);
    } else {
      x.finish(408);
    }
    co_return false;
  }
  co_return true;
}

// Refuses a request before its body is needed: a small body is read so the
// connection stays usable; a large one is left unread and the connection closes.
awaitable<bool> Session::refuse(http::request_parser<http::string_body>& parser, Exchange& x, ApiError error) {
  // A client waiting for 100 Continue never gets it: it sends no body, and
  // the connection closes rather than guess whether one follows.
  bool waiting_to_send = beast::iequals(parser.get()[http::field::expect], "100-continue");
  bool small = !waiting_to_send && parser.content_length() && *parser.content_length() <= kDrainableBody;
  if (small && !co_await read_body(parser, x)) co_return false;
  co_return co_await respond_error(parser.get(), x, error, !parser.is_done());
}

awaitable<bool> Session::handle_models(const Request& req, Exchange& x) {
  x.admission = gw_.quotas.admit(x.subject(), 0, x.event.ts);
  if (!x.admission->allowed) {
    auto limited = rate_limited(x.admission->reason, x.admission->retry_after_s);
    co_return co_await respond_error(req, x, limited);
  }
  const auto& allowed = x.caller->key.models;
  auto res = make_response(req, http::status::ok,
                           allowed.empty() ? gw_.all_models_body : model_list_body(gw_.router, allowed));
  set_rate_limit_headers(res, x.admission->status);
  x.finish(200);
  co_return co_await write(std::move(res));
}

awaitable<bool> Session::handle_completion(const Request& req, Exchange& x, bool chat, bool embeddings) {
  // Every request from a known key is admitted before it is judged, so bad
  // ones (malformed, unknown or forbidden model) count against its limits too.
  auto parsed = embeddings ? parse_embeddings_request(req.body()) : parse_completion_request(req.body(), chat);
  if (auto* e = std::get_if<ApiError>(&parsed)) {
    x.admission = gw_.quotas.admit(x.subject(), 0, x.event.ts);
    if (!x.admission->allowed) {
      auto limited = rate_limited(x.admission->reason, x.admission->retry_after_s);
      co_return co_await respond_error(req, x, limited);
    }
    co_return co_await respond_error(req, x, *e);
  }
  auto& completion = std::get<ParsedCompletion>(parsed);
  auto& creq = completion.request;
  x.event.model = creq.model;

  // Messages quote a client's model name only in part.
  const std::string quoted = "'" + metering::excerpt(creq.model) + "'";
  std::optional<ApiError> refusal;
  auto plan = gw_.router.plan(creq.model);
  if (plan.empty()) {
    refusal = not_found("the model " + quoted + " does not exist", "model_not_found");
  } else if (!x.caller->key.allows_model(creq.model)) {
    refusal = forbidden("this API key may not use the model " + quoted);
  } else {
    std::erase_if(plan, [&](const backends::Deployment* d) {
      auto caps = d->backend->capabilities();
      if (embeddings) return !caps.embeddings;
      return (chat && !caps.chat) || (!chat && !caps.completions) || (creq.stream && !caps.streaming);
    });
    if (plan.empty()) {
      refusal =
          bad_request("the model " + quoted + " does not " +
                          (embeddings ? std::string("serve embeddings") : std::string("support this kind of request")),
                      "model");
    }
  }
  creq.user = x.caller->key.user_name;

  // A refused request reserves no tokens; one that will run reserves its prompt and its longest answer.
  std::int64_t prompt_estimate = refusal ? 0 : plan.front()->backend->estimate_prompt_tokens(creq);
  std::int64_t reserve = refusal || embeddings
                             ? prompt_estimate
                             : prompt_estimate + creq.max_tokens.value_or(gw_.config.metering.default_reserve_tokens);
  x.admission = gw_.quotas.admit(x.subject(), reserve, x.event.ts);
  if (!x.admission->allowed) {
    auto limited = rate_limited(x.admission->reason, x.admission->retry_after_s);
    co_return co_await respond_error(req, x, limited);
  }
  if (refusal) {
    if (refusal->status == 403) gw_.metrics.auth_failures.labels({"model_not_allowed"}).inc();
    co_return co_await respond_error(req, x, *refusal);
  }

  CompletionFormatter format(chat, creq.model, completion.include_usage, creq.logprobs.has_value());
  bool stream_mode = creq.stream;
  std::string text;                              // non-streaming: the whole reply
  std::vector<backends::TokenLogprob> logprobs;  // non-streaming, when asked for
  std::string extra_json;                        // non-streaming: the backend's tool_calls and such
  std::int64_t deltas = 0;                       // what reached the client, should the backend never report usage
  bool headers_sent = false;
  std::optional<http::response_serializer<http::empty_body>> serializer;
  http::response<http::empty_body> stream_head{http::status::ok, req.version()};

  // Streams one piece of SSE data to the client; false when the client is gone.
  auto send_chunk = [&](std::string data) -> awaitable<bool> {
    stream().expires_after(limits().idle_timeout);
    if (!headers_sent) {
      headers_sent = true;
      stream_head.set(http::field::server, "tollgate");
      stream_head.set(http::field::content_type, "text/event-stream");
      stream_head.set(http::field::cache_control, "no-cache");
      stream_head.set("x-accel-buffering", "no");
      set_rate_limit_headers(stream_head, x.admission->status);
      stream_head.keep_alive(req.keep_alive() && !gw_.stopping);
      stream_head.chunked(true);
      serializer.emplace(stream_head);
      auto [ec, n] = co_await http::async_write_header(stream(), *serializer, as_tuple);
      if (ec) co_return false;
    }
    auto [ec, n] = co_await net::async_write(stream(), http::make_chunk(net::buffer(data)), as_tuple);
    co_return !ec;
  };

  bool client_pipelined = false;  // the client sent more: it is there, and its bytes wait their turn
  // Deployments are tried in the plan's order until one answers; a retryable
  // failure moves on only while nothing has reached the client.
  for (std::size_t attempt = 0;; ++attempt) {
    const backends::Deployment& deployment = *plan[attempt];
    backends::InFlight in_flight(deployment);
    auto* backend = deployment.backend;
    x.event.backend = backend->name();
    backends::CompletionRequest attempt_request = creq;
    attempt_request.upstream_model = deployment.upstream_model;
    auto sink = std::make_shared<SessionSink>(stream().get_executor());
    conn_->sink = sink;
    auto backend_started = SteadyClock::now();
    std::unique_ptr<backends::CompletionHandle> handle;
    try {
      handle = backend->start(std::move(attempt_request), sink);
    } catch (const std::exception& e) {
      // A backend bug must not take the connection down with an unmetered request.
      std::cerr << "tollgate: backend " << x.event.backend << " failed to start: " << e.what() << "\n";
    }
    if (!handle) {
      auto failed = from_backend({backends::ErrorKind::internal, "the backend failed", {}});
      co_return co_await respond_error(req, x, failed);
    }
    bool retry = false;
    while (!retry) {
      auto next = co_await next_events(*sink, !stream_mode, client_pipelined);
      if (!next) {
        handle->cancel();
        x.backend_time = std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - backend_started);
        x.finish(499);  // the client hung up while the answer was being produced
        co_return false;
      }
      auto events = std::move(*next);
      for (auto& ev : events) {
        switch (ev.type) {
          case backends::CompletionEvent::Type::delta:
            // Kept current so a request cut short (disconnect, forced shutdown)
            // is metered with what it produced.
            x.event.prompt_tokens = prompt_estimate;
            x.event.completion_tokens = deltas + 1;
            x.event.estimated = true;
            if (deltas++ == 0 && stream_mode) {
              x.event.ttft_us = micros_since(x.started);
              gw_.metrics.time_to_first_token.labels({x.event.model, x.event.backend})
                  .observe(static_cast<double>(*x.event.ttft_us) / 1e6);
            }
            if (!stream_mode) {
              text += ev.text;
              std::move(ev.logprobs.begin(), ev.logprobs.end(), std::back_inserter(logprobs));
              if (!ev.extra_json.empty()) extra_json = std::move(ev.extra_json);
            } else if (!co_await send_chunk(format.delta_event(ev.text, ev.logprobs, ev.extra_json))) {
              handle->cancel();
              x.backend_time =
                  std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - backend_started);
              x.finish(499);  // the client went away mid-stream
              co_return false;
            }
            break;
          case backends::CompletionEvent::Type::done: {
            x.backend_time =
                std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - backend_started);
            gw_.metrics.backend_duration.labels({x.event.backend}).observe(seconds_since(backend_started));
            gw_.router.record_success(deployment);
            x.event.prompt_tokens = ev.usage.prompt_tokens;
            x.event.completion_tokens = ev.usage.completion_tokens;
            x.event.estimated = ev.usage.estimated;
            if (!stream_mode) {
              auto res = make_response(
                  req, http::status::ok,
                  embeddings ? std::move(text)
                             : format.full_response(text, ev.finish_reason, ev.usage, logprobs, extra_json));
              set_rate_limit_headers(res, x.admission->status);
              x.finish(200);
              co_return co_await write(std::move(res));
            }
            std::string tail = format.finish_event(ev.finish_reason);
            if (completion.include_usage) tail += format.usage_event(ev.usage);
            tail += CompletionFormatter::done_event();
            bool ok = co_await send_chunk(std::move(tail));
            x.finish(ok ? 200 : 499);
            if (!ok) co_return false;
            stream().expires_after(limits().idle_timeout);
            auto [ec, n] = co_await net::async_write(stream(), http::make_chunk_last(), as_tuple);
            co_return !ec && stream_head.keep_alive() && !close_after_;
          }
          case backends::CompletionEvent::Type::error: {
            x.backend_time =
                std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - backend_started);
            gw_.metrics.backend_duration.labels({x.event.backend}).observe(seconds_since(backend_started));
            gw_.metrics.backend_errors.labels({x.event.backend, error_kind_label(ev.error.kind)}).inc();
            if (retryable(ev.error.kind)) gw_.router.record_failure(deployment);
            if (retryable(ev.error.kind) && deltas == 0 && attempt + 1 < plan.size() && !gw_.cut_off) {
              // Nothing reached the client: back off a little, then the next deployment.
              net::steady_timer backoff(stream().get_executor());
              backoff.expires_after(std::chrono::milliseconds(std::min<std::int64_t>(1000, 50LL << attempt)));
              co_await backoff.async_wait(as_tuple);
              retry = true;
              break;
            }
            // Without a count from the backend (a shutdown cut, say), what
            // reached the client stays metered as estimated above.
            if (ev.usage.prompt_tokens || ev.usage.completion_tokens) {
              x.event.prompt_tokens = ev.usage.prompt_tokens;
              x.event.completion_tokens = ev.usage.completion_tokens;
              x.event.estimated = ev.usage.estimated;
            }
            auto api_error = from_backend(ev.error);
            if (!headers_sent) co_return co_await respond_error(req, x, api_error);
            // Mid-stream: the status is already 200; an error event tells the client.
            bool ok = co_await send_chunk(format.error_event(api_error));
            x.finish(api_error.status);
            // The stream ends here either way; a failed last chunk changes nothing.
            if (ok) co_await net::async_write(stream(), http::make_chunk_last(), as_tuple);
            co_return false;
          }
        }
      }
    }
  }
}

awaitable<bool> Session::handle_admin_route(http::request_parser<http::string_body>& parser, Exchange& x) {
  auto& req = parser.get();
  auto key = presented_key(req[http::field::authorization], req["x-api-key"]);
  if (!key) {
    auto missing = unauthorized("missing admin key", "missing_api_key");
    co_return co_await refuse(parser, x, missing);
  }
  if (!gw_.admin_key.matches(*key)) {
    auto outcome = gw_.keys->authenticate(*key, metering::now_ms());
    if (outcome.status == AuthOutcome::Status::ok) {
      x.identify(outcome.entry);
      gw_.metrics.auth_failures.labels({"not_admin"}).inc();
      auto not_admin = forbidden("this key is not the admin key", "admin_key_required");
      co_return co_await refuse(parser, x, not_admin);
    }
    auto invalid = unauthorized("invalid admin key");
    co_return co_await refuse(parser, x, invalid);
  }
  if (!co_await read_body(parser, x)) co_return false;
  std::string method(req.method_string()), target(req.target()), body = req.body();
  auto admin_call = [this, method, target, body] {
    try {
      return handle_admin(*gw_.admin_store, method, target, body, metering::now_ms());
    } catch (const std::exception& e) {
      return AdminResponse{500, ApiError{500, e.what(), "server_error", std::nullopt, "internal_error", {}}.body()};
    }
  };
  auto result = co_await run_blocking(gw_, std::move(admin_call));
  if (result.keys_changed) {
    auto refresh = [this] { return gw_.keys->refresh_if_changed(); };
    co_await run_blocking(gw_, std::move(refresh));
  }
  auto res = make_response(req, static_cast<http::status>(result.status), std::move(result.body));
  x.finish(result.status);
  co_return co_await write(std::move(res));
}

// X-Forwarded-For gets the client's address appended when the peer is a
// trusted proxy, and replaced otherwise, as do the other forwarding headers.
void Session::set_forwarding_headers(const Request& req, backends::AppForward& how) {
  if (!peer_) {
    beast::error_code ec;
    auto address = stream().socket().remote_endpoint(ec).address();
    if (address.is_v6() && address.to_v6().is_v4_mapped()) {
      address = net::ip::make_address_v4(net::ip::v4_mapped, address.to_v6());
    }
    peer_ = address;
    peer_text_ = address.to_string();
  }
  bool trusted = std::find(gw_.trusted_proxies.begin(), gw_.trusted_proxies.end(), *peer_) != gw_.trusted_proxies.end();
  std::string forwarded_for;
  if (trusted) {
    // Every X-Forwarded-For line, in order: several are one comma-separated list.
    for (const auto& f : req) {
      if (!beast::iequals(f.name_string(), "X-Forwarded-For") || how.drop_request.contains(f.name_string())) continue;
      if (!forwarded_for.empty()) forwarded_for += ", ";
      forwarded_for += f.value();
    }
  } else {
    for (std::string_view name :
         {"X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Real-IP", "Forwarded"}) {
      how.drop_request.add(name);
    }
  }
  if (!forwarded_for.empty()) forwarded_for += ", ";
  forwarded_for += peer_text_;
  how.set_request_header("X-Forwarded-For", forwarded_for);
  // Tollgate itself speaks plain HTTP; TLS ends at a proxy in front, which says so.
  if (!trusted || req["X-Forwarded-Proto"].empty()) how.set_request_header("X-Forwarded-Proto", "http");
  if ((!trusted || req["X-Forwarded-Host"].empty()) && !req[http::field::host].empty()) {
    how.set_request_header("X-Forwarded-Host", req[http::field::host]);
  }
}

// Everything the gateway does not own, proxied to the app: authenticated and
// counted against request quotas unless the path is public, metered per user.
awaitable<bool> Session::handle_app(http::request_parser<http::string_body>& parser, Exchange& x,
                                    std::string_view path) {
  auto& req = parser.get();
  x.route = "app";  // the metrics label stays bounded; the usage row has the path
  x.event.route = std::string(path.substr(0, kMaxMeteredPath));
  x.event.backend = "app";
  bool is_public = is_public_path(gw_.config.public_paths, path);
  backends::AppForward how;
  if (!is_public) {
    if (auto e = co_await authenticate(req, x)) co_return co_await refuse(parser, x, *e);
    x.admission = gw_.quotas.admit(x.subject(), 0, x.event.ts);
    if (!x.admission->allowed) {
      auto limited = rate_limited(x.admission->reason, x.admission->retry_after_s);
      co_return co_await refuse(parser, x, limited);
    }
    how.set_request_header("X-Tollgate-User", x.caller->key.user_name);
    how.set_request_header("X-Tollgate-Key-Id", x.caller->key.prefix);
    for_each_rate_limit_header(x.admission->status, [&how](std::string_view name, std::string_view value) {
      how.set_response_header(name, value);
    });
  } else {
    // Only Tollgate vouches for who the caller is.
    how.drop_request.add("X-Tollgate-User");
    how.drop_request.add("X-Tollgate-Key-Id");
  }

  // The app never sees a Tollgate key: every header holding the key this
  // request used, or anything shaped like one, goes whole (a cookie too).
  {
    std::string_view used =
        is_public ? std::string_view{} : presented_key(req[http::field::authorization], req["x-api-key"]).value_or("");
    for (const auto& f : req) {
      auto value = f.value();
      if (holds_tollgate_key({value.data(), value.size()}, used)) {
        if (f.name() == http::field::host) {
          auto bad = bad_request("a key in the Host header", std::nullopt, "bad_http");
          co_return co_await refuse(parser, x, bad);
        }
        auto name = f.name_string();
        how.drop_request.add({name.data(), name.size()});
      }
    }
  }
  how.target = origin_form(req.target());
  set_forwarding_headers(req, how);
  how.client_read_timeout = limits().body_timeout;
  how.client_write_timeout = limits().idle_timeout;
  const unsigned version = req.version();
  const bool keep_alive = req.keep_alive();
  how.client_keep_alive = keep_alive && !gw_.stopping;

  auto out = co_await gw_.app->forward(stream(), deadline_, buffer_, parser, how);
  deadline_.disarm();
  x.backend_time = out.upstream_time;
  using Failure = backends::AppOutcome::Failure;
  if (out.response_started) {
    // Once the app's status went out, a failure can only cut the connection.
    int status = out.failure == Failure::client_gone ? 499 : out.failure == Failure::broken_response ? 502 : out.status;
    x.finish(status);
    co_return out.failure == Failure::none&& out.keep_client;
  }
  if (out.failure == Failure::client_gone) {
    x.finish(499);
    co_return false;
  }
  if (out.failure == Failure::bad_request) {
    Request head{http::verb::get, "", version};
    auto bad = bad_request("malformed request body: " + out.detail, std::nullopt, "bad_body");
    co_return co_await respond_error(head, x, bad, true);
  }
  Request head{http::verb::get, "", version};
  head.keep_alive(keep_alive);
  ApiError failed =
      out.failure == Failure::timeout
          ? ApiError{504,
                     "the app did not answer in time (" + out.detail + ")",
                     "server_error",
                     std::nullopt,
                     "app_timeout",
                     {}}
          : ApiError{
                502, "the app is unreachable (" + out.detail + ")", "server_error", std::nullopt, "app_unreachable",
                {}};
  // An unread request body leaves the connection without framing: it closes.
  co_return co_await respond_error(head, x, failed, !out.request_body_read);
}

// Dispatches one request whose headers have been read; returns whether the
// connection stays open for another.
awaitable<bool> Session::handle(http::request_parser<http::string_body>& parser) {
  auto& req = parser.get();
  std::string_view path = target_path(req.target());
  Exchange x(gw_, path);
  auto method = req.method();

  if (gw_.app && !gateway_owns(path)) co_return co_await handle_app(parser, x, path);
  // The gateway's own routes buffer their bodies: those are capped.
  parser.body_limit(limits().max_body);
  if (parser.content_length() && *parser.content_length() > limits().max_body) {
    ApiError too_large{413,
                       "request body exceeds the limit of " + std::to_string(limits().max_body) + " bytes",
                       "invalid_request_error",
                       std::nullopt,
                       "request_too_large",
                       {}};
    co_return co_await respond_error(req, x, too_large, true);
  }

  if (path.starts_with("/admin/") || path == "/admin") co_return co_await handle_admin_route(parser, x);

  // Public routes.
  if (path == "/healthz" || path == "/readyz" || path == "/metrics") {
    if (!co_await read_body(parser, x)) co_return false;
    if (method != http::verb::get) {
      ApiError wrong_method{405, "use GET", "invalid_request_error", std::nullopt, "method_not_allowed", {}};
      co_return co_await respond_error(req, x, wrong_method);
    }
    Response res;
    if (path == "/metrics") {
      gw_.metrics.metering_queue_depth.set(static_cast<double>(gw_.usage->queue_depth()));
      res = make_response(req, http::status::ok, gw_.metrics.registry.render(),
                          "text/plain; version=0.0.4; charset=utf-8");
    } else if (path == "/readyz" && gw_.stopping) {
      res = make_response(req, http::status::service_unavailable, R"({"status":"stopping"})");
    } else {
      res = make_response(req, http::status::ok, R"({"status":"ok"})");
    }
    x.finish(res.result_int());
    co_return co_await write(std::move(res));
  }

  bool is_chat = path == "/v1/chat/completions";
  bool is_completion = path == "/v1/completions";
  bool is_embeddings = path == "/v1/embeddings";
  bool is_models = path == "/v1/models";
  if (!is_chat && !is_completion && !is_embeddings && !is_models) {
    if (!co_await read_body(parser, x)) co_return false;
    auto no_route = not_found("no route for " + metering::excerpt(path), "unknown_route");
    co_return co_await respond_error(req, x, no_route);
  }

  // Authenticate before reading a body, so strangers cannot make us buffer one.
  if (auto e = co_await authenticate(req, x)) co_return co_await refuse(parser, x, *e);
  if (!co_await read_body(parser, x)) co_return false;

  if (is_models) {
    if (method != http::verb::get) {
      ApiError wrong_method{405, "use GET", "invalid_request_error", std::nullopt, "method_not_allowed", {}};
      co_return co_await respond_error(req, x, wrong_method);
    }
    co_return co_await handle_models(req, x);
  }
  if (method != http::verb::post) {
    ApiError wrong_method{405, "use POST", "invalid_request_error", std::nullopt, "method_not_allowed", {}};
    co_return co_await respond_error(req, x, wrong_method);
  }
  co_return co_await handle_completion(req, x, is_chat, is_embeddings);
}

awaitable<void> Session::run() {
  bool first = true;
  for (;;) {
    if (buffer_.size() == 0) {
      // Waiting for a request: only now may the shutdown close the connection.
      conn_->idle = true;
      if (gw_.stopping) break;
      deadline_.arm(first ? limits().header_timeout : limits().idle_timeout);
      auto [ec, n] = co_await stream().socket().async_read_some(buffer_.prepare(8192), as_tuple);
      if (ec) break;  // idle timeout, client closed, or shutdown
      buffer_.commit(n);
    }
    conn_->idle = false;
    first = false;

    http::request_parser<http::string_body> parser;
    // No limit yet: bodies proxied to the app stream through unbounded;
    // handle() caps the gateway's own routes once the path is known.
    parser.body_limit(boost::none);
    deadline_.arm(limits().header_timeout);
    // Beast applies header_limit to the unparsed bytes of each put(), not to
    // the whole header: fed in small reads, a header of any size would pass.
    // So the header is parsed here, with the limit shrinking as it is consumed.
    beast::error_code ec;
    std::size_t header_bytes = 0;
    for (;;) {
      if (buffer_.size() > 0) {
        parser.header_limit(static_cast<std::uint32_t>(limits().max_header - header_bytes));
        std::size_t used = parser.put(buffer_.data(), ec);
        buffer_.consume(used);
        header_bytes += used;
        if (ec != http::error::need_more) break;  // the header is complete, or broken
        if (header_bytes >= limits().max_header) {
          ec = http::error::header_limit;
          break;
        }
      }
      auto [read_ec, n] = co_await stream().socket().async_read_some(buffer_.prepare(8192), as_tuple);
      if (read_ec) {
        ec = read_ec == net::error::eof ? beast::error_code(http::error::end_of_stream) : deadline_.outcome(read_ec);
        break;
      }
      buffer_.commit(n);
    }
    if (ec) {
      // A slow or vanished client gets no answer; protocol errors get one and a close.
      if (ec == beast::error::timeout || ec == http::error::end_of_stream || ec == net::error::eof ||
          ec == net::error::connection_reset || ec == net::error::operation_aborted) {
        break;
      }
      Request req;
      req.version(11);
      Exchange x(gw_, "other");
      // Named, not braced inside the co_await: g++ 12 would destroy the temporary twice.
      ApiError error;
      if (ec == http::error::header_limit) {
        error = {431, "request headers are too large", "invalid_request_error", std::nullopt, "headers_too_large", {}};
      } else if (ec == http::error::body_limit) {
        error = {413,
                 "request body exceeds the limit of " + std::to_string(limits().max_body) + " bytes",
                 "invalid_request_error",
                 std::nullopt,
                 "request_too_large",
                 {}};
      } else {
        error = bad_request("malformed HTTP request: " + ec.message(), std::nullopt, "bad_http");
      }
      co_await respond_error(req, x, error, true);
      break;
    }
    // The deadline guards raw reads and writes only: past this point a long
    // answer (a stream on the stream's own expiry) must not be cut by it.
    deadline_.disarm();
    if (auto violation = check_request_head(parser.get())) {
      // Framing the gateway cannot be sure of is never acted on: answered, closed.
      Request req;
      req.version(11);
      Exchange x(gw_, "other");
      ApiError error{violation->status, violation->message, "invalid_request_error", std::nullopt, violation->code, {}};
      co_await respond_error(req, x, error, true);
      break;
    }
    close_after_ = false;
    if (!co_await handle(parser)) break;
    if (close_after_) break;
  }
  beast::error_code ignored;
  stream().socket().shutdown(tcp::socket::shutdown_send, ignored);
  stream().close();
}

void log_session_error(std::exception_ptr e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    std::cerr << "tollgate: session failed: " << ex.what() << "\n";
  }
}

awaitable<void> run_session(Gateway& gw, std::shared_ptr<Connection> conn) {
  Session session(gw, std::move(conn));
  co_await session.run();
}

awaitable<void> accept_loop(Gateway& gw, tcp::acceptor& acceptor) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(as_tuple);
    if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;  // shutdown closed the acceptor
    if (ec) continue;  // e.g. EMFILE: the client retries; we keep serving the rest
    if (gw.open_connections.load() >= gw.config.limits.max_connections) {
      gw.metrics.rejected_connections.inc();
      beast::error_code ignored;
      socket.close(ignored);
      continue;
    }
    socket.set_option(tcp::no_delay(true), ec);
    auto conn = std::make_shared<Connection>(std::move(socket));
    {
      std::lock_guard lock(gw.connections_mutex);
      std::erase_if(gw.connections, [](const auto& w) { return w.expired(); });
      gw.connections.push_back(conn);
    }
    gw.open_connections.fetch_add(1);
    gw.metrics.open_connections.add(1);
    net::co_spawn(acceptor.get_executor(), run_session(gw, std::move(conn)), [&gw](std::exception_ptr e) {
      gw.open_connections.fetch_sub(1);
      gw.metrics.open_connections.add(-1);
      log_session_error(e);
    });
  }
}

// Waits for busy connections to finish, at most shutdown_grace, then stops every context.
awaitable<void> drain(Gateway& gw, std::vector<std::unique_ptr<net::io_context>>& contexts) {
  auto deadline = SteadyClock::now() + gw.config.limits.shutdown_grace;
  net::steady_timer timer(co_await net::this_coro::executor);
  while (gw.open_connections.load() > 0 && SteadyClock::now() < deadline) {
    timer.expires_after(std::chrono::milliseconds(20));
    co_await timer.async_wait(use_awaitable);
  }
  if (gw.open_connections.load() > 0) {
    // Completions still running are told why they end: a stream gets an SSE
    // error event, an answer not yet begun a 503. They get a moment to say it.
    gw.cut_off = true;
    std::lock_guard lock(gw.connections_mutex);
    for (auto& weak : gw.connections) {
      auto conn = weak.lock();
      if (!conn) continue;
      net::post(conn->stream.get_executor(), [conn] {
        auto sink = conn->sink.lock();
        if (!sink) return;
        backends::CompletionEvent ev;
        ev.type = backends::CompletionEvent::Type::error;
        ev.error = {backends::ErrorKind::overloaded, "the gateway is shutting down", 1};
        sink->on_event(std::move(ev));
      });
    }
  }
  auto last_words = SteadyClock::now() + std::chrono::milliseconds(500);
  while (gw.open_connections.load() > 0 && SteadyClock::now() < last_words) {
    timer.expires_after(std::chrono::milliseconds(20));
    co_await timer.async_wait(use_awaitable);
  }
  for (auto& c : contexts) c->stop();
}

}  // namespace

int run_server(const Config& config) {
  Gateway gw(config);
  gw.router = backends::Router({config.routing.cooldown_failures, config.routing.cooldown});
  for (const auto& b : config.backends) gw.router.add_backend(b.spec->make({gw.metrics.registry}));
  for (const auto& m : config.models) {
    backends::Route route{
        m.name, {}, m.least_busy ? backends::RoutingStrategy::least_busy : backends::RoutingStrategy::weighted};
    for (const auto& d : m.deployments) {
      backends::Deployment deployment;
      deployment.backend = gw.router.backend(d.backend);
      deployment.upstream_model = d.model;
      deployment.weight = d.weight;
      route.deployments.push_back(std::move(deployment));
    }
    gw.router.add_route(std::move(route));
  }

  gw.all_models_body = model_list_body(gw.router, {});

  // Opening the store migrates the schema before anything else touches it.
  gw.admin_store = metering::open_sqlite_store(config.database);
  gw.admin_key = establish_admin_key(*gw.admin_store);
  if (gw.admin_key.created_plaintext) {
    std::cout << "tollgate: created the admin key (shown once, keep it): " << *gw.admin_key.created_plaintext
              << std::endl;
  }
  gw.keys = std::make_unique<KeyCache>(metering::open_sqlite_store(config.database));
  gw.keys->start_refreshing(std::chrono::seconds(1));
  auto now = metering::now_ms();
  gw.quotas.restore(gw.admin_store->quota_state(now), now);
  gw.usage = std::make_unique<metering::UsageWriter>(
      metering::open_sqlite_store(config.database), config.metering.flush_interval, 4096,
      [&gw](std::size_t rows, std::chrono::microseconds took) {
        gw.metrics.metering_rows.inc(static_cast<double>(rows));
        gw.metrics.metering_flush_duration.observe(std::chrono::duration<double>(took).count());
      });

  int threads =
      config.io_threads > 0 ? config.io_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // One io_context per thread, each with its own SO_REUSEPORT acceptor: the
  // kernel spreads connections and no session ever crosses threads.
  std::vector<std::unique_ptr<net::io_context>> contexts;
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors;
  tcp::endpoint endpoint(net::ip::make_address(config.listen.host), config.listen.port);
  for (int i = 0; i < threads; ++i) {
    contexts.push_back(std::make_unique<net::io_context>(1));
    auto acceptor = std::make_unique<tcp::acceptor>(*contexts.back());
    acceptor->open(endpoint.protocol());
    acceptor->set_option(net::socket_base::reuse_address(true));
    acceptor->set_option(net::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>(true));
    acceptor->bind(endpoint);
    acceptor->listen(net::socket_base::max_listen_connections);
    endpoint = acceptor->local_endpoint();  // a port of 0 is now the real one, shared by the rest
    acceptors.push_back(std::move(acceptor));
  }
  if (config.app_upstream) {
    const auto& a = *config.app_upstream;
    backends::AppUpstreamOptions options{a.host, a.port, a.connect_timeout, a.first_byte_timeout, a.idle_timeout};
    gw.app = std::make_unique<backends::AppUpstream>(std::move(options));
    for (auto& c : contexts) gw.app->add_context(*c);
  }
  for (const auto& t : config.trusted_proxies) gw.trusted_proxies.push_back(net::ip::make_address(t));
  for (int i = 0; i < threads; ++i) {
    net::co_spawn(*contexts[i], accept_loop(gw, *acceptors[i]), net::detached);
  }

  auto signals = std::make_unique<net::signal_set>(*contexts[0], SIGINT, SIGTERM);
  signals->async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    gw.stopping = true;
    for (int i = 0; i < threads; ++i) {
      net::post(*contexts[i], [&, i] {
        beast::error_code ignored;
        acceptors[i]->close(ignored);
      });
    }
    {
      std::lock_guard lock(gw.connections_mutex);
      for (auto& weak : gw.connections) {
        auto conn = weak.lock();
        if (!conn) continue;
        net::post(conn->stream.get_executor(), [conn] {
          if (conn->idle) conn->stream.cancel();
        });
      }
    }
    // Busy connections finish their request; past the grace period the contexts stop.
    net::co_spawn(*contexts[0], drain(gw, contexts), net::detached);
  });

  std::cout << "tollgate: listening on http://" << (endpoint.address().is_v6() ? "[" : "")
            << endpoint.address().to_string() << (endpoint.address().is_v6() ? "]" : "") << ":" << endpoint.port()
            << std::endl;

  std::vector<std::thread> workers;
  for (int i = 1; i < threads; ++i) workers.emplace_back([&, i] { contexts[i]->run(); });
  contexts[0]->run();
  for (auto& w : workers) w.join();

  // Teardown order matters. Backends go first, dropping the sinks they hold
  // while the contexts still exist; then the contexts destroy the sessions cut
  // off by the grace period, whose requests are metered as they unwind; then
  // metering flushes.
  gw.router = backends::Router();
  gw.app.reset();  // pooled app connections live on the contexts: closed first
  signals.reset();
  acceptors.clear();
  contexts.clear();

  gw.usage->stop();
  auto stats = gw.usage->stats();
  std::cout << "tollgate: stopped; " << stats.written << " usage events written" << std::endl;
  return 0;
}

}  // namespace tollgate::gateway
