// The reverse proxy to the app Tollgate fronts: a keep-alive connection pool
// per io thread, and the relay that streams one request and its response
// through it. Exposes Beast types, so only gateway/server.cpp includes it.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/fields.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/container/small_vector.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gateway/proxy/io_deadline.hpp"

namespace tollgate::proxy {

struct AppUpstreamOptions {
  std::string host;
  std::uint16_t port = 80;
  std::chrono::milliseconds connect_timeout{2'000};
  std::chrono::milliseconds first_byte_timeout{60'000};
  std::chrono::milliseconds idle_timeout{60'000};
  std::size_t max_idle_per_thread = 256;
};

// Header names, compared case-insensitively. Holds views: the names must
// outlive it (literals, or names inside the message being filtered).
class HeaderNames {
 public:
  void add(std::string_view name) { names_.push_back(name); }
  bool contains(std::string_view name) const;

 private:
  boost::container::small_vector<std::string_view, 12> names_;
};

// What the gateway decided about one proxied request. Headers it sets go out
// as wire lines after the message's own, whose copies of them are dropped.
struct AppForward {
  std::string_view target;       // the request target the app receives; empty: the client's
  std::string request_headers;   // "Name: value\r\n" lines added to the request
  HeaderNames drop_request;      // client headers the app never sees
  std::string response_headers;  // lines added to the response to the client
  HeaderNames drop_response;     // app headers the client never sees
  std::chrono::milliseconds client_read_timeout{30'000};   // each read of the request body
  std::chrono::milliseconds client_write_timeout{60'000};  // each write to the client
  bool client_keep_alive = true;                           // the client may send another request afterwards

  // Replace whatever the client (or the app) sent under `name`, a literal.
  void set_request_header(std::string_view name, std::string_view value);
  void set_response_header(std::string_view name, std::string_view value);
};

struct AppOutcome {
  enum class Failure {
    none,
    unreachable,      // connect failed, or the app broke the exchange before answering: 502
    timeout,          // connect, first byte or idle timeout before answering: 504
    malformed,        // the app's response head broke HTTP's rules (framing, syntax): 502
    broken_response,  // the app answered, then failed mid-body: the client connection is cut
    client_gone,      // the client vanished or stalled: nothing more can be sent
    bad_request,      // the client's body is malformed (chunk syntax): 400, and the connection closes
  };
  Failure failure = Failure::none;
  int status = 0;                  // what the client received (when response_started)
  bool response_started = false;   // bytes of the app's response reached the client
  bool request_body_read = false;  // the client's request was read to its end: framing kept
  bool keep_client = false;        // the client connection can serve another request
  std::chrono::microseconds upstream_time{0};
  std::string detail;  // for logs and error messages
};

// One per gateway. Each io thread gets its own pool, so sessions (which never
// cross threads) take and return connections without locks.
class AppUpstream {
 public:
  explicit AppUpstream(AppUpstreamOptions options);
  ~AppUpstream();
  AppUpstream(const AppUpstream&) = delete;
  AppUpstream& operator=(const AppUpstream&) = delete;

  // Registers an io thread's context; all of them before any request.
  void add_context(boost::asio::io_context& context);

  // Streams the request whose headers `parser` holds (its body still unread,
  // partly in `client_buffer`) to the app and the app's answer back to
  // `client`. Hop-by-hop headers are removed both ways and bodies re-framed.
  // `client_deadline` keeps the client's socket, on which forward() operates
  // directly (the stream's own expiry only for an interim 100 Continue).
  boost::asio::awaitable<AppOutcome> forward(
      boost::beast::tcp_stream& client, IoDeadline& client_deadline, boost::beast::flat_buffer& client_buffer,
      boost::beast::http::request_parser<boost::beast::http::string_body>& parser, const AppForward& how);

 private:
  struct Pool;
  struct Connection;
  Pool& pool_for(const boost::asio::any_io_executor& ex);

  AppUpstreamOptions options_;
  std::vector<std::unique_ptr<Pool>> pools_;
};

// Appends `fields` as they go on the wire, "Name: value\r\n" each, leaving
// out the hop-by-hop ones of RFC 9110 §7.6.1 (Connection and every header it
// names, Keep-Alive, Proxy-Connection, TE, Transfer-Encoding, Upgrade,
// Proxy-Authorization, Proxy-Authenticate, Trailer), Content-Length (the
// gateway frames every body it forwards itself) and those in `drop`.
// Connection can never name Host or the framing headers away.
void append_end_to_end_fields(std::string& out, const boost::beast::http::fields& fields, const HeaderNames& drop);

// "Name: value\r\n", with any CR, LF or NUL in the value made a space: a
// value from elsewhere (a user's name) can never split the header.
void append_header_line(std::string& out, std::string_view name, std::string_view value);

// A response's status line and header fields as they go on the wire, ending
// in the blank line: Beast's generic serializers cost tens of thousands of
// instructions per small message (callgrind), so small ones are framed by hand.
std::string response_head(const boost::beast::http::response_header<>& res);

}  // namespace tollgate::proxy
