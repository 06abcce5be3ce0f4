#include "backends/http_client.hpp"

#include <openssl/ssl.h>

#include <algorithm>
#include <boost/url/parse.hpp>

namespace tollgate::backends {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = net::ssl;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

bool is_ip_literal(const std::string& host) {
  boost::system::error_code ec;
  net::ip::make_address(host, ec);
  return !ec;
}

}  // namespace

// Lists an acquire's timer among the waiters for as long as it waits, however
// the wait ends (at shutdown the coroutine is destroyed mid-wait).
class HttpClient::PoolWaiter {
 public:
  PoolWaiter(HttpClient& client, net::steady_timer& wait) : client_(client), wait_(&wait) {
    client_.waiters_.push_back(wait_);
  }
  ~PoolWaiter() { std::erase(client_.waiters_, wait_); }
  PoolWaiter(const PoolWaiter&) = delete;
  PoolWaiter& operator=(const PoolWaiter&) = delete;

 private:
  HttpClient& client_;
  net::steady_timer* wait_;
};

std::string UpstreamOrigin::host_header() const {
  bool default_port = (tls && port == "443") || (!tls && port == "80");
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return default_port ? h : h + ":" + port;
}

std::optional<UpstreamOrigin> parse_base_url(const std::string& url, std::string& error) {
  auto parsed = boost::urls::parse_absolute_uri(url);
  if (!parsed) {
    error = "'" + url + "' is not an absolute URL";
    return std::nullopt;
  }
  UpstreamOrigin o;
  auto scheme = parsed->scheme();
  if (scheme == "https") {
    o.tls = true;
  } else if (scheme != "http") {
    error = "'" + url + "' must start with http:// or https://";
    return std::nullopt;
  }
  o.host = std::string(parsed->encoded_host_address());
  if (o.host.size() >= 2 && o.host.front() == '[') o.host = o.host.substr(1, o.host.size() - 2);
  if (o.host.empty()) {
    error = "'" + url + "' names no host";
    return std::nullopt;
  }
  if (parsed->has_userinfo() || parsed->has_query() || parsed->has_fragment()) {
    // Not quoted: user info or a query may hold a credential, and this error is logged.
    error = "must be scheme://host[:port][/path] only (no user info, query or fragment)";
    return std::nullopt;
  }
  o.port = parsed->has_port() ? std::string(parsed->port()) : (o.tls ? "443" : "80");
  o.base_path = std::string(parsed->encoded_path());
  while (!o.base_path.empty() && o.base_path.back() == '/') o.base_path.pop_back();
  return o;
}

UpstreamConnection::UpstreamConnection(HttpClient& owner, net::io_context& ioc, ssl::context* tls) : owner_(owner) {
  if (tls) {
    tls_.emplace(ioc, *tls);
  } else {
    plain_.emplace(ioc);
  }
  ++owner_.open_;
}

UpstreamConnection::~UpstreamConnection() {
  close();
  --owner_.open_;
  owner_.wake_waiters();
}

beast::tcp_stream& UpstreamConnection::tcp() { return tls_ ? beast::get_lowest_layer(*tls_) : *plain_; }

net::awaitable<UpstreamConnection::IoResult> UpstreamConnection::write(Request& request) {
  if (tls_) co_return co_await http::async_write(*tls_, request, as_tuple);
  co_return co_await http::async_write(*plain_, request, as_tuple);
}

net::awaitable<UpstreamConnection::IoResult> UpstreamConnection::read_header(Parser& parser) {
  if (tls_) co_return co_await http::async_read_header(*tls_, buffer_, parser, as_tuple);
  co_return co_await http::async_read_header(*plain_, buffer_, parser, as_tuple);
}

net::awaitable<UpstreamConnection::IoResult> UpstreamConnection::read_some(Parser& parser) {
  if (tls_) co_return co_await http::async_read_some(*tls_, buffer_, parser, as_tuple);
  co_return co_await http::async_read_some(*plain_, buffer_, parser, as_tuple);
}

void UpstreamConnection::close() {
  if (!open_) return;
  open_ = false;
  // No TLS close_notify: the connection is dropped, never half-used again,
  // and waiting for the peer's reply could hang on a dead upstream.
  tcp().close();
}

HttpClient::HttpClient(net::io_context& ioc, UpstreamOrigin origin, HttpClientOptions options)
    : ioc_(ioc), origin_(std::move(origin)), options_(std::move(options)), resolver_(ioc) {
  if (!origin_.tls) return;
  tls_context_.emplace(ssl::context::tls_client);
  tls_context_->set_default_verify_paths();
  if (!options_.ca_file.empty()) tls_context_->load_verify_file(options_.ca_file);
  tls_context_->set_verify_mode(options_.insecure_skip_verify ? ssl::verify_none : ssl::verify_peer);
}

HttpClient::~HttpClient() { shutdown(); }

void HttpClient::shutdown() {
  shut_down_ = true;
  idle_.clear();
}

void HttpClient::wake_waiters() {
  for (auto* wait : waiters_) wait->cancel();
}

net::awaitable<std::unique_ptr<UpstreamConnection>> HttpClient::acquire(SteadyClock::time_point deadline,
                                                                        const std::atomic<bool>& cancelled,
                                                                        net::steady_timer& wait,
                                                                        ConnectFailure& failure) {
  for (;;) {
    if (cancelled) {
      failure = {false, true, "cancelled"};
      co_return nullptr;
    }
    while (!idle_.empty()) {
      auto conn = std::move(idle_.back());
      idle_.pop_back();
      if (SteadyClock::now() - conn->idle_since_ < options_.pool_idle) {
        conn->reused = true;
        co_return conn;
      }
    }
    if (open_ < options_.max_connections) co_return co_await connect(deadline, failure);
    if (SteadyClock::now() >= deadline) {
      failure = {true, false, "no upstream connection became free within the connect timeout"};
      co_return nullptr;
    }
    // The pool is full: a connection that closes or comes back wakes this
    // wait (single-threaded, so none can be missed between check and wait).
    wait.expires_at(deadline);
    PoolWaiter waiting(*this, wait);
    co_await wait.async_wait(as_tuple);
  }
}

net::awaitable<std::unique_ptr<UpstreamConnection>> HttpClient::connect(SteadyClock::time_point deadline,
                                                                        ConnectFailure& failure) {
  auto conn = std::make_unique<UpstreamConnection>(*this, ioc_, tls_context_ ? &*tls_context_ : nullptr);
  auto now = SteadyClock::now();
  if (!address_ || address_->expires <= now) {
    auto [ec, results] = co_await resolver_.async_resolve(origin_.host, origin_.port, as_tuple);
    if (ec) {
      failure = {false, false, "cannot resolve " + origin_.host + ": " + ec.message()};
      co_return nullptr;
    }
    address_ = CachedAddress{results, now + options_.dns_ttl};
  }
  conn->expires_at(deadline);
  auto [ec, endpoint] = co_await conn->tcp().async_connect(address_->results, as_tuple);
  if (ec) {
    // A later call resolves afresh: the address may be what changed.
    address_.reset();
    failure = {ec == beast::error::timeout, false,
               "cannot connect to " + origin_.host + ":" + origin_.port + ": " + ec.message()};
    co_return nullptr;
  }
  conn->tcp().socket().set_option(net::ip::tcp::no_delay(true), ec);
  if (conn->tls_) {
    // SNI is for names only; an IP literal is matched against the certificate's IP SANs.
    if (!is_ip_literal(origin_.host) && !SSL_set_tlsext_host_name(conn->tls_->native_handle(), origin_.host.c_str())) {
      failure = {false, false, "cannot set the TLS server name"};
      co_return nullptr;
    }
    if (!options_.insecure_skip_verify) conn->tls_->set_verify_callback(ssl::host_name_verification(origin_.host));
    auto [hec] = co_await conn->tls_->async_handshake(ssl::stream_base::client, as_tuple);
    if (hec) {
      failure = {hec == beast::error::timeout, false,
                 "TLS handshake with " + origin_.host + ":" + origin_.port + " failed: " + hec.message()};
      co_return nullptr;
    }
  }
  co_return conn;
}

void HttpClient::release(std::unique_ptr<UpstreamConnection> connection) {
  if (shut_down_ || !connection->open_) return;
  connection->idle_since_ = SteadyClock::now();
  connection->reused = false;
  connection->tcp().expires_never();
  idle_.push_back(std::move(connection));
  wake_waiters();
}

}  // namespace tollgate::backends
