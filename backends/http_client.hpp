// An HTTP/1.1 client for one upstream origin: a keep-alive connection pool
// with a maximum size, cached DNS, TLS with certificate and host-name
// verification, deadlines on every step. Included only by the backends that
// call upstreams; it runs on its owner's io_context and is used from that
// context's single thread only, so it needs no locks.
#pragma once

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tollgate::backends {

// Where an upstream lives: "https://api.groq.com/openai/v1".
struct UpstreamOrigin {
  bool tls = false;
  std::string host;
  std::string port;       // "443" when the URL names none
  std::string base_path;  // "/openai/v1", never with a trailing slash
  std::string host_header() const;
};

// Parses an http(s) base URL; std::nullopt with `error` set when it is not one.
std::optional<UpstreamOrigin> parse_base_url(const std::string& url, std::string& error);

struct HttpClientOptions {
  std::chrono::milliseconds connect_timeout{10'000};  // DNS, TCP and TLS handshake together
  std::size_t max_connections = 64;
  std::string ca_file;  // trusted in addition to the system store
  bool insecure_skip_verify = false;
  std::chrono::seconds dns_ttl{30};
  std::chrono::seconds pool_idle{30};  // an idle connection older than this is not reused
};

class HttpClient;

// What a connection buffers of an answer that the parser cannot take yet
// (headers are capped at 8 KiB by the parser; a chunk header or trailer that
// never ends stops here): past it a read fails with http::error::buffer_overflow.
inline constexpr std::size_t kMaxUpstreamReadBuffer = 1024 * 1024;

// One connection to the upstream, plain or TLS. Destroying it closes it.
class UpstreamConnection {
 public:
  using Parser = boost::beast::http::response_parser<boost::beast::http::string_body>;
  using Request = boost::beast::http::request<boost::beast::http::string_body>;
  using IoResult = std::tuple<boost::system::error_code, std::size_t>;

  UpstreamConnection(HttpClient& owner, boost::asio::io_context& ioc, boost::asio::ssl::context* tls);
  ~UpstreamConnection();
  UpstreamConnection(const UpstreamConnection&) = delete;
  UpstreamConnection& operator=(const UpstreamConnection&) = delete;

  boost::beast::tcp_stream& tcp();
  void expires_at(std::chrono::steady_clock::time_point deadline) { tcp().expires_at(deadline); }

  boost::asio::awaitable<IoResult> write(Request& request);
  boost::asio::awaitable<IoResult> read_header(Parser& parser);
  boost::asio::awaitable<IoResult> read_some(Parser& parser);
  // Aborts pending operations; the connection is not reused afterwards.
  void close();

  bool reused = false;  // came from the pool: the server may have closed it meanwhile

 private:
  friend class HttpClient;
  HttpClient& owner_;
  std::optional<boost::beast::tcp_stream> plain_;
  std::optional<boost::beast::ssl_stream<boost::beast::tcp_stream>> tls_;
  boost::beast::flat_buffer buffer_{kMaxUpstreamReadBuffer};
  std::chrono::steady_clock::time_point idle_since_;
  bool open_ = true;
};

// Why acquire() failed: timeouts map to 504, the rest to 502.
struct ConnectFailure {
  bool timeout = false;
  bool cancelled = false;
  std::string message;
};

class HttpClient {
 public:
  HttpClient(boost::asio::io_context& ioc, UpstreamOrigin origin, HttpClientOptions options);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  const UpstreamOrigin& origin() const { return origin_; }

  // A pooled connection, or a new one when fewer than max_connections are
  // open; otherwise waits on `wait` for one to close or come back, until
  // `deadline`. Cancelling `wait` (on this client's thread) makes it look
  // again, so a caller that sets `cancelled` wakes it that way.
  boost::asio::awaitable<std::unique_ptr<UpstreamConnection>> acquire(std::chrono::steady_clock::time_point deadline,
                                                                      const std::atomic<bool>& cancelled,
                                                                      boost::asio::steady_timer& wait,
                                                                      ConnectFailure& failure);
  // Returns a connection whose last response was read to its end and allows keep-alive.
  void release(std::unique_ptr<UpstreamConnection> connection);
  // Drops the idle connections; later releases close theirs.
  void shutdown();

 private:
  friend class UpstreamConnection;
  class PoolWaiter;
  // A connection closed or came back: every waiting acquire looks again.
  void wake_waiters();
  boost::asio::awaitable<std::unique_ptr<UpstreamConnection>> connect(std::chrono::steady_clock::time_point deadline,
                                                                      ConnectFailure& failure);

  struct CachedAddress {
    boost::asio::ip::tcp::resolver::results_type results;
    std::chrono::steady_clock::time_point expires;
  };

  boost::asio::io_context& ioc_;
  UpstreamOrigin origin_;
  HttpClientOptions options_;
  std::optional<boost::asio::ssl::context> tls_context_;
  boost::asio::ip::tcp::resolver resolver_;
  std::optional<CachedAddress> address_;
  std::size_t open_ = 0;  // idle plus leased
  bool shut_down_ = false;
  std::vector<std::unique_ptr<UpstreamConnection>> idle_;
  std::vector<boost::asio::steady_timer*> waiters_;  // the timers of acquires waiting for a connection
};

}  // namespace tollgate::backends
