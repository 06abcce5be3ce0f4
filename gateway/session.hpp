// One client connection: reads requests, dispatches each by the route table,
// writes the answers. Internal to the gateway's sources.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "gateway/event_queue.hpp"
#include "gateway/exchange.hpp"
#include "gateway/gateway_state.hpp"
#include "gateway/http_error.hpp"
#include "gateway/proxy/io_deadline.hpp"
#include "gateway/routes.hpp"

namespace tollgate::gateway {

using Request = boost::beast::http::request<boost::beast::http::string_body>;
using Response = boost::beast::http::response<boost::beast::http::string_body>;
using RequestParser = boost::beast::http::request_parser<boost::beast::http::string_body>;

// The Date header's value now (IMF-fixdate).
std::string_view http_date();
Response make_response(const Request& req, boost::beast::http::status status, std::string body,
                       std::string_view content_type = "application/json");
void set_rate_limit_headers(boost::beast::http::fields& fields, const metering::RateLimitStatus& status);

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

class Session {
 public:
  Session(Gateway& gw, std::shared_ptr<Connection> conn);

  // Serves requests until the client leaves, an answer closes the connection, or the gateway stops.
  boost::asio::awaitable<void> run();

 private:
  friend class HttpCompletionClient;

  boost::beast::tcp_stream& stream() { return conn_->stream; }
  const ServerLimits& limits() const { return gw_.config.limits; }

  // Each returns whether the connection stays open for another request.
  boost::asio::awaitable<bool> handle(RequestParser& parser);
  boost::asio::awaitable<bool> write(Response res);
  boost::asio::awaitable<bool> respond_error(const Request& req, Exchange& x, const ApiError& e, bool close = false);
  // Refuses a request before its body is needed (reading a small one to keep the connection).
  boost::asio::awaitable<bool> refuse(RequestParser& parser, Exchange& x, ApiError error);
  boost::asio::awaitable<bool> read_body(RequestParser& parser, Exchange& x);
  boost::asio::awaitable<bool> respond_too_large(const Request& req, Exchange& x);
  Response caller_error_response(const Request& req, Exchange& x, const ApiError& e);
  boost::asio::awaitable<boost::beast::error_code> read_rest(RequestParser& parser);
  boost::asio::awaitable<std::optional<ApiError>> authenticate(const Request& req, Exchange& x);
  // Admits the request against its limits into x.admission, reserving
  // `reserve_tokens`; with shared budgets, claims the leases it lacks off the
  // io thread first. The refusal to send, if refused.
  boost::asio::awaitable<std::optional<ApiError>> admit(Exchange& x, std::int64_t reserve_tokens);

  // Route handlers (session_routes.cpp, session_completion.cpp, session_app.cpp).
  boost::asio::awaitable<bool> handle_status(const Request& req, Exchange& x, RouteHandler which);
  boost::asio::awaitable<bool> handle_admin_route(RequestParser& parser, Exchange& x);
  std::optional<ApiError> check_admin_key(const Request& req, Exchange& x);
  boost::asio::awaitable<bool> handle_models(const Request& req, Exchange& x, std::string_view path);
  boost::asio::awaitable<bool> handle_completion(const Request& req, Exchange& x, RouteHandler which);
  boost::asio::awaitable<bool> handle_app(RequestParser& parser, Exchange& x, std::string_view path);
  boost::asio::awaitable<bool> handle_jobs(const Request& req, Exchange& x);
  boost::asio::awaitable<bool> submit_job(const Request& req, Exchange& x, const JobEndpointConfig& endpoint,
                                          bool sync);
  boost::asio::awaitable<bool> write_json(const Request& req, Exchange& x, std::string body);
  bool peer_is_trusted();

  // The backend's next events. For an answer that is not streamed, the client
  // is watched meanwhile, so one that hangs up cancels the work at once
  // (nullopt) instead of when the answer would be written; a streamed answer
  // notices at its next write.
  boost::asio::awaitable<std::optional<std::deque<backends::CompletionEvent>>> next_events(EventQueue& queue,
                                                                                           bool watch_client);

  Gateway& gw_;
  std::shared_ptr<Connection> conn_;
  // For reading requests, writing whole answers and the app proxy, which use
  // the socket directly; streamed answers use the stream's own expiry.
  proxy::IoDeadline deadline_;
  boost::beast::flat_buffer buffer_;
  bool head_only_ = false;                        // the request is a HEAD: the next answer goes without its body
  bool close_after_ = false;                      // the request's body was not read: framing is lost
  bool client_pipelined_ = false;                 // the client sent more: it is there, and its bytes wait their turn
  std::optional<boost::asio::ip::address> peer_;  // the client's address, looked up once
  std::string peer_text_;                         // and as text
};

}  // namespace tollgate::gateway
