#include "gateway/session.hpp"

#include <sys/socket.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <cerrno>
#include <ctime>

#include "gateway/http_rules.hpp"
#include "gateway/proxy/app_upstream.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using net::awaitable;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

// Bodies up to this size are read even when the request is refused before
// needing them, to keep the connection.
constexpr std::uint64_t kDrainableBody = 64 * 1024;

Response error_response(const Request& req, const ApiError& e) {
  auto res = make_response(req, static_cast<http::status>(e.status), e.body());
  if (e.retry_after_s) res.set(http::field::retry_after, std::to_string(*e.retry_after_s));
  return res;
}

ApiError too_large_error(std::size_t max_body) {
  return {413,
          "request body exceeds the limit of " + std::to_string(max_body) + " bytes",
          "invalid_request_error",
          std::nullopt,
          "request_too_large",
          {}};
}

bool method_allowed(std::uint8_t methods, http::verb verb) {
  if (methods == kAnyMethod) return true;
  return ((methods & kGet) && verb == http::verb::get) || ((methods & kPost) && verb == http::verb::post) ||
         ((methods & kHead) && verb == http::verb::head);
}

}  // namespace

std::string_view http_date() {
  // Formatted once a second per thread: every answer carries it (RFC 9110 6.6.1).
  thread_local std::time_t cached = -1;
  thread_local char text[40];
  const std::time_t now = std::time(nullptr);
  if (now != cached) {
    std::tm utc{};
    gmtime_r(&now, &utc);
    std::strftime(text, sizeof text, "%a, %d %b %Y %H:%M:%S GMT", &utc);
    cached = now;
  }
  return text;
}

Response make_response(const Request& req, http::status status, std::string body, std::string_view content_type) {
  Response res{status, req.version()};
  res.set(http::field::server, "tollgate");
  res.set(http::field::date, http_date());
  res.set(http::field::content_type, content_type);
  res.keep_alive(req.keep_alive());
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

void set_rate_limit_headers(http::fields& fields, const metering::RateLimitStatus& status) {
  for_each_rate_limit_header(status,
                             [&fields](std::string_view name, std::string_view value) { fields.set(name, value); });
}

Session::Session(Gateway& gw, std::shared_ptr<Connection> conn)
    : gw_(gw), conn_(std::move(conn)), deadline_(conn_->stream.get_executor(), conn_->stream.socket()) {}

awaitable<bool> Session::write(Response res) {
  if (close_after_ || gw_.stopping) res.keep_alive(false);
  bool keep = res.keep_alive();
  // A string body is framed by hand in one buffer (see proxy::response_head).
  std::string wire = proxy::response_head(res);
  if (!head_only_) wire += res.body();
  deadline_.arm(limits().idle_timeout);
  auto [ec, n] = co_await net::async_write(stream().socket(), net::buffer(wire), as_tuple);
  deadline_.disarm();
  co_return !ec && keep;
}

// An error answer; a known caller's carries its rate-limit headers.
Response Session::caller_error_response(const Request& req, Exchange& x, const ApiError& e) {
  auto res = error_response(req, e);
  if (x.caller)
    set_rate_limit_headers(res, x.admission ? x.admission->status : gw_.quotas.status(x.subject(), metering::now_ms()));
  return res;
}

awaitable<bool> Session::respond_error(const Request& req, Exchange& x, const ApiError& e, bool close) {
  if (close) close_after_ = true;
  auto res = caller_error_response(req, x, e);
  x.finish(e.status);
  co_return co_await write(std::move(res));
}

awaitable<std::optional<ApiError>> Session::admit(Exchange& x, std::int64_t reserve_tokens) {
  const metering::QuotaSubject subject = x.subject();
  metering::Admission admission = gw_.quotas.admit(subject, reserve_tokens, x.event.ts);
  // Leases fall short: claimed on the quota pool. Again only when requests on
  // other threads took what was claimed; bounded.
  for (int attempt = 0; admission.pending && attempt < 4; ++attempt) {
    auto claim = [quotas = &gw_.quotas, subject, reserve_tokens, ts = x.event.ts] {
      return quotas->claim(subject, reserve_tokens, ts);
    };
    admission = co_await run_on(gw_.quota_pool, std::move(claim));
  }
  if (admission.pending) {
    admission.pending = false;
    admission.claims.clear();
    admission.refusal_status = 503;
    admission.reason = "too many requests competing for this key's quota: try again";
    admission.limit = "contended";
    admission.retry_after_s = 1;
  }
  x.admission = std::move(admission);
  if (x.admission->allowed) co_return std::nullopt;
  if (x.admission->refusal_status == 503) {
    co_return ApiError{503,          x.admission->reason, "server_error",
                       std::nullopt, "quota_unavailable", x.admission->retry_after_s};
  }
  co_return rate_limited(x.admission->reason, x.admission->retry_after_s);
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

// Whether a chunked body's unparsed bytes hold a line feed without its
// carriage return. Beast parses a chunk line only once its CRLF is there, so
// a client that ends chunk lines with a bare LF would wait for the body
// timeout; the app proxy's decoder refuses the same bytes at once.
static bool bare_line_feed(std::string_view pending) {
  for (std::size_t i = pending.find('\n'); i != std::string_view::npos; i = pending.find('\n', i + 1)) {
    if (i == 0 || pending[i - 1] != '\r') return true;
  }
  return false;
}

// The rest of the request (the body) into `parser`, within the stream's expiry.
awaitable<beast::error_code> Session::read_rest(RequestParser& parser) {
  parser.eager(true);
  beast::error_code ec;
  while (!parser.is_done()) {
    if (buffer_.size() > 0) {
      const auto used = parser.put(buffer_.data(), ec);
      buffer_.consume(used);
      if (!ec && used > 0) continue;  // a piece parsed: what is buffered may hold more
      if (ec && ec != http::error::need_more) co_return ec;
      if (ec == http::error::need_more && parser.chunked()) {
        const auto pending = buffer_.data();
        // A chunk line (or trailer) longer than a whole header is no client's.
        if (bare_line_feed({static_cast<const char*>(pending.data()), pending.size()}) ||
            pending.size() > limits().max_header) {
          co_return http::error::bad_chunk;
        }
      }
      ec = {};
    }
    auto [read_ec, n] = co_await stream().async_read_some(buffer_.prepare(8192), as_tuple);
    if (read_ec == net::error::eof) co_return http::error::end_of_stream;  // the client left mid-body
    if (read_ec) co_return read_ec;
    buffer_.commit(n);
  }
  co_return ec;
}

awaitable<bool> Session::read_body(RequestParser& parser, Exchange& x) {
  auto& req = parser.get();
  if (parser.is_done()) co_return true;
  if (beast::iequals(req[http::field::expect], "100-continue")) {
    http::response<http::empty_body> cont{http::status::continue_, req.version()};
    stream().expires_after(limits().idle_timeout);
    auto [ec, n] = co_await http::async_write(stream(), cont, as_tuple);
    if (ec) co_return false;
  }
  stream().expires_after(limits().body_timeout);
  const auto ec = co_await read_rest(parser);
  if (ec == http::error::body_limit) {
    co_await respond_too_large(req, x);
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

// 413, and a close. A known key's request is admitted first (with nothing
// reserved), so it counts against the key's limits: a flood of oversized
// bodies meets the same 429 as any other.
awaitable<bool> Session::respond_too_large(const Request& req, Exchange& x) {
  if (x.caller && !x.admission) {
    if (auto refused = co_await admit(x, 0)) co_return co_await respond_error(req, x, *refused, true);
  }
  // g++ 12 destroys a braced temporary inside a co_await twice: name it first.
  auto too_large = too_large_error(limits().max_body);
  co_return co_await respond_error(req, x, too_large, true);
}

// A small body is read so the connection stays usable; a large one is left
// unread and the connection closes.
awaitable<bool> Session::refuse(RequestParser& parser, Exchange& x, ApiError error) {
  // A client waiting for 100 Continue never gets it: it sends no body, and
  // the connection closes rather than guess whether one follows.
  bool waiting_to_send = beast::iequals(parser.get()[http::field::expect], "100-continue");
  bool small = !waiting_to_send && parser.content_length() && *parser.content_length() <= kDrainableBody;
  if (small && !co_await read_body(parser, x)) co_return false;
  co_return co_await respond_error(parser.get(), x, error, !parser.is_done());
}

awaitable<std::optional<std::deque<backends::CompletionEvent>>> Session::next_events(EventQueue& queue,
                                                                                     bool watch_client) {
  if (!watch_client || client_pipelined_) co_return co_await queue.next();
  using namespace net::experimental::awaitable_operators;
  auto& socket = stream().socket();
  for (;;) {
    auto first = co_await (queue.next() || socket.async_wait(tcp::socket::wait_read, as_tuple));
    if (first.index() == 0) co_return std::move(std::get<0>(first));
    // Readable: end of stream or an error means the client left; bytes are
    // a pipelined request, left in the socket for later.
    char byte;
    auto n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
      client_pipelined_ = true;
      co_return co_await queue.next();
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) co_return std::nullopt;
  }
}

// Dispatches one request whose headers have been read, by the route table.
awaitable<bool> Session::handle(RequestParser& parser) {
  auto& req = parser.get();
  // Whatever the gateway answers a HEAD with goes without its body.
  head_only_ = req.method() == http::verb::head;
  std::string_view path = target_path(req.target());
  const Route* route = find_route(path);
  // Without job endpoints, /v2 is not the gateway's: an app behind it may use it.
  if (route && route->handler == RouteHandler::jobs && gw_.config.jobs.endpoints.empty()) route = nullptr;
  Exchange x(gw_, route ? route->label : "other");

  if (gw_.app && !route) co_return co_await handle_app(parser, x, path);
  // The gateway's own routes buffer their bodies: those are capped.
  parser.body_limit(limits().max_body);
  const bool too_large = parser.content_length() && *parser.content_length() > limits().max_body;
  if (too_large && route && route->auth == RouteAuth::key) {
    // Whose it is first: a known key's oversized request is metered and
    // counts against its limits, like any bad request. A stranger's is not read.
    if (auto e = co_await authenticate(req, x)) co_return co_await respond_error(req, x, *e, true);
    co_return co_await respond_too_large(req, x);
  }
  if (too_large) co_return co_await respond_too_large(req, x);
  if (!route) {
    if (!co_await read_body(parser, x)) co_return false;
    auto no_route = not_found("no route for " + metering::excerpt(path), "unknown_route");
    co_return co_await respond_error(req, x, no_route);
  }
  // The admin API checks its own key and methods.
  if (route->auth == RouteAuth::admin) co_return co_await handle_admin_route(parser, x);
  // Authenticate before reading a body, so strangers cannot make us buffer one.
  if (route->auth == RouteAuth::key) {
    if (auto e = co_await authenticate(req, x)) co_return co_await refuse(parser, x, *e);
  }
  if (!co_await read_body(parser, x)) co_return false;
  if (!method_allowed(route->methods, req.method())) {
    ApiError wrong_method{405,
                          "use " + std::string(allowed_methods_text(route->methods)),
                          "invalid_request_error",
                          std::nullopt,
                          "method_not_allowed",
                          {}};
    auto res = caller_error_response(req, x, wrong_method);
    res.set(http::field::allow, allow_header(route->methods));
    x.finish(405);
    co_return co_await write(std::move(res));
  }
  switch (route->handler) {
    case RouteHandler::chat_completions:
    case RouteHandler::completions:
    case RouteHandler::embeddings:
      co_return co_await handle_completion(req, x, route->handler);
    case RouteHandler::models:
      co_return co_await handle_models(req, x, path);
    case RouteHandler::health:
    case RouteHandler::readiness:
    case RouteHandler::metrics:
      co_return co_await handle_status(req, x, route->handler);
    case RouteHandler::jobs:
      co_return co_await handle_jobs(req, x);
    case RouteHandler::admin:
      break;  // dispatched above, before its body is read
  }
  co_return co_await handle_admin_route(parser, x);
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

    RequestParser parser;
    head_only_ = false;
    // No limit yet: bodies proxied to the app stream through unbounded;
    // handle() caps the gateway's own routes once the path is known.
    parser.body_limit(boost::none);
    deadline_.arm(limits().header_timeout);
    // Beast applies header_limit to the unparsed bytes of each put(), not to
    // the whole header: fed in small reads, a header of any size would pass.
    // So the header is parsed here, with the limit shrinking as it is consumed.
    beast::error_code ec;
    std::size_t header_bytes = 0;
    std::size_t empty_lines = 0;
    for (;;) {
      // Empty lines before a request line are ignored (RFC 9112 2.2: some
      // clients end a body with an extra CRLF), a few of them.
      while (header_bytes == 0 && empty_lines < 8 && buffer_.size() >= 2 &&
             std::string_view(static_cast<const char*>(buffer_.data().data()), 2) == "\r\n") {
        buffer_.consume(2);
        ++empty_lines;
      }
      if (buffer_.size() > 0 && !(header_bytes == 0 && empty_lines < 8 && buffer_.size() == 1 &&
                                  *static_cast<const char*>(buffer_.data().data()) == '\r')) {
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
        error = too_large_error(limits().max_body);
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

}  // namespace tollgate::gateway
