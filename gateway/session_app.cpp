// Everything the gateway does not own, proxied to the app: authenticated and
// counted against request quotas unless the path is public, metered per user.
#include "gateway/app_forwarding.hpp"
#include "gateway/session.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using net::awaitable;

// The usage row keeps an app call's path; a client cannot make rows arbitrarily big.
constexpr std::size_t kMaxMeteredPath = 512;

}  // namespace

// The client's address, looked up once per connection, and whether it is a trusted proxy.
bool Session::peer_is_trusted() {
  if (!peer_) {
    beast::error_code ec;
    auto address = stream().socket().remote_endpoint(ec).address();
    if (address.is_v6() && address.to_v6().is_v4_mapped()) {
      address = net::ip::make_address_v4(net::ip::v4_mapped, address.to_v6());
    }
    peer_ = address;
    peer_text_ = address.to_string();
  }
  return std::find(gw_.trusted_proxies.begin(), gw_.trusted_proxies.end(), *peer_) != gw_.trusted_proxies.end();
}

awaitable<bool> Session::handle_app(RequestParser& parser, Exchange& x, std::string_view path) {
  auto& req = parser.get();
  x.route = "app";  // the metrics label stays bounded; the usage row has the path
  x.event.route = std::string(path.substr(0, kMaxMeteredPath));
  x.event.backend = "app";
  bool is_public = is_public_path(gw_.config.public_paths, path);
  proxy::AppForward how;
  std::optional<AppCaller> caller;
  if (!is_public) {
    if (auto e = co_await authenticate(req, x)) co_return co_await refuse(parser, x, *e);
    if (auto refused = co_await admit(x, 0)) {
      co_return co_await refuse(parser, x, *refused);
    }
    caller = AppCaller{x.caller->key.user_name, x.caller->key.prefix,
                       presented_key(req[http::field::authorization], req["x-api-key"]).value_or("")};
    for_each_rate_limit_header(x.admission->status, [&how](std::string_view name, std::string_view value) {
      how.set_response_header(name, value);
    });
  }
  bool trusted = peer_is_trusted();
  if (auto violation = plan_app_request(req, caller, peer_text_, trusted, how)) {
    auto bad = bad_request(violation->message, std::nullopt, violation->code);
    co_return co_await refuse(parser, x, bad);
  }
  how.client_read_timeout = limits().body_timeout;
  how.client_write_timeout = limits().idle_timeout;
  const unsigned version = req.version();
  const bool keep_alive = req.keep_alive();
  how.client_keep_alive = keep_alive && !gw_.stopping;

  auto out = co_await gw_.app->forward(stream(), deadline_, buffer_, parser, how);
  deadline_.disarm();
  x.backend_time = out.upstream_time;
  using Failure = proxy::AppOutcome::Failure;
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
  ApiError failed{502, "", "server_error", std::nullopt, "", {}};
  if (out.failure == Failure::timeout) {
    failed.status = 504;
    failed.message = "the app did not answer in time (" + out.detail + ")";
    failed.code = "app_timeout";
  } else if (out.failure == Failure::malformed) {
    failed.message = "the app sent a malformed response (" + out.detail + ")";
    failed.code = "app_bad_response";
  } else {
    failed.message = "the app is unreachable (" + out.detail + ")";
    failed.code = "app_unreachable";
  }
  // An unread request body leaves the connection without framing: it closes.
  co_return co_await respond_error(head, x, failed, !out.request_body_read);
}

}  // namespace tollgate::gateway
