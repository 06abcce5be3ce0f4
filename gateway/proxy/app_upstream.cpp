#include "gateway/proxy/app_upstream.hpp"

#include <sys/socket.h>

#include <array>
#include <boost/asio.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <charconv>
#include <optional>
#include <span>

namespace tollgate::proxy {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using net::awaitable;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);
using namespace net::experimental::awaitable_operators;

// Each relay step moves at most this much: memory per proxied request stays
// bounded whatever the body size, and a slow reader slows the writer.
constexpr std::size_t kRelayChunk = 64 * 1024;

// A 1xx the app sends on its own (Tollgate answers Expect itself) is skipped;
// this many in a row means the app is broken.
constexpr int kMaxInterimResponses = 8;

bool is_timeout(const beast::error_code& ec) { return ec == beast::error::timeout; }

// The app closed a kept-alive connection just as it was reused: the request
// never reached it, so it may be sent again on a fresh connection.
bool is_stale_connection(const beast::error_code& ec) {
  return ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset ||
         ec == net::error::broken_pipe;
}

// True when the client hangs up (end of stream or an error); false once
// cancelled. Bytes the client sends meanwhile are a pipelined request, left in
// the socket for later: the watch then only waits to be cancelled.
awaitable<bool> until_client_leaves(tcp::socket& client) {
  for (;;) {
    auto [ec] = co_await client.async_wait(tcp::socket::wait_read, as_tuple);
    if (ec == net::error::operation_aborted) co_return false;
    char byte;
    auto n = ::recv(client.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (ec || n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) co_return true;
    if (n > 0) break;
  }
  net::steady_timer forever(client.get_executor(), SteadyClock::time_point::max());
  co_await forever.async_wait(as_tuple);
  co_return false;
}

}  // namespace

struct AppUpstream::Connection {
  explicit Connection(const net::any_io_executor& ex) : stream(ex), deadline(ex, stream.socket()) {}
  beast::tcp_stream stream;  // its own expiry only for connecting; the rest goes through `deadline`
  IoDeadline deadline;
  beast::flat_buffer buffer;
  bool reused = false;
};

struct AppUpstream::Pool {
  net::execution_context* context = nullptr;
  std::vector<std::unique_ptr<Connection>> idle;  // most recently used last
};

AppUpstream::AppUpstream(AppUpstreamOptions options) : options_(std::move(options)) {}
AppUpstream::~AppUpstream() = default;

void AppUpstream::add_context(net::io_context& context) {
  auto pool = std::make_unique<Pool>();
  pool->context = &context;
  pools_.push_back(std::move(pool));
}

AppUpstream::Pool& AppUpstream::pool_for(const net::any_io_executor& ex) {
  auto* context = &net::query(ex, net::execution::context);
  for (auto& p : pools_) {
    if (p->context == context) return *p;
  }
  // Every io thread registers at start; a session elsewhere is a wiring bug.
  throw std::logic_error("AppUpstream: executor of an unregistered io_context");
}

bool HeaderNames::contains(std::string_view name) const {
  for (auto n : names_) {
    // Lengths first: most names differ there, and iequals is a call.
    if (n.size() == name.size() && beast::iequals(n, name)) return true;
  }
  return false;
}

void append_header_line(std::string& out, std::string_view name, std::string_view value) {
  out.append(name);
  out += ": ";
  const std::size_t at = out.size();
  out.append(value);
  for (std::size_t i = at; i < out.size(); ++i) {
    if (out[i] == '\r' || out[i] == '\n' || out[i] == '\0') out[i] = ' ';
  }
  out += "\r\n";
}

void AppForward::set_request_header(std::string_view name, std::string_view value) {
  if (request_headers.empty()) request_headers.reserve(256);  // the gateway's five lines, usually
  append_header_line(request_headers, name, value);
  drop_request.add(name);
}

void AppForward::set_response_header(std::string_view name, std::string_view value) {
  append_header_line(response_headers, name, value);
  drop_response.add(name);
}

namespace {

// Hop-by-hop, or framing the gateway writes itself.
bool is_hop_by_hop(http::field f) {
  switch (f) {
    case http::field::content_length:
    case http::field::connection:
    case http::field::keep_alive:
    case http::field::proxy_connection:
    case http::field::te:
    case http::field::transfer_encoding:
    case http::field::upgrade:
    case http::field::proxy_authorization:
    case http::field::proxy_authenticate:
    case http::field::trailer:
      return true;
    default:
      return false;
  }
}

// A parsed field's line, as it arrived.
void append_field(std::string& out, const http::fields::value_type& field) {
  auto name = field.name_string();
  auto value = field.value();
  out.append(name.data(), name.size());
  out += ": ";
  out.append(value.data(), value.size());
  out += "\r\n";
}

// "HTTP/1.x 200 OK\r\n".
void append_status_line(std::string& out, unsigned version, const http::response_header<>& res) {
  out += version == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
  out += std::to_string(res.result_int());
  out += ' ';
  auto reason = res.reason();
  out.append(reason.data(), reason.size());
  out += "\r\n";
}

}  // namespace

void append_end_to_end_fields(std::string& out, const http::fields& fields, const HeaderNames& drop) {
  // Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1); every
  // Connection line counts, wherever it is.
  // Host and the framing headers are not Connection's to remove: a client
  // that names them is asking for a desync.
  HeaderNames named;
  for (const auto& f : fields) {
    if (f.name() != http::field::connection) continue;
    for (auto token : http::token_list(f.value())) {
      auto which = http::string_to_field(token);
      if (which == http::field::host || which == http::field::content_length ||
          which == http::field::transfer_encoding) {
        continue;
      }
      named.add(std::string_view(token.data(), token.size()));
    }
  }
  for (const auto& f : fields) {
    auto name = f.name_string();
    const std::string_view n(name.data(), name.size());
    if (is_hop_by_hop(f.name()) || named.contains(n) || drop.contains(n)) continue;
    append_field(out, f);
  }
}

namespace {

// A kept-alive connection the app has closed is readable (EOF) or reset; a
// live one has nothing to read. Bytes nobody asked for (an answer to a request
// the gateway never sent) mean the framing is off: never reused, or they would
// reach the next user as their answer. A peek without blocking tells them apart.
bool looks_alive(tcp::socket& socket, const beast::flat_buffer& leftover) {
  if (leftover.size() > 0) return false;
  char byte;
  auto n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

// The request line and header the app receives: HTTP/1.1 whatever the
// client spoke, the client's end-to-end fields minus `drop`, the gateway's.
// The body is framed by what the gateway's parser read, never by the
// client's lines: chunked, or the one Content-Length the parser settled on.
std::string request_head(const http::request_header<>& req, const HeaderNames& drop, const AppForward& how,
                         bool chunked, std::optional<std::uint64_t> content_length, std::string_view app_host) {
  std::string out;
  out.reserve(512);
  auto method = req.method_string();
  std::string_view target =
      how.target.empty() ? std::string_view(req.target().data(), req.target().size()) : how.target;
  out.append(method.data(), method.size());
  out += ' ';
  out.append(target);
  out += " HTTP/1.1\r\n";
  append_end_to_end_fields(out, req, drop);
  // HTTP/1.1 needs a Host; an HTTP/1.0 client may have sent none.
  if (req.find(http::field::host) == req.end()) append_header_line(out, "Host", app_host);
  out += how.request_headers;
  if (chunked) {
    out += "Transfer-Encoding: chunked\r\n";
  } else if (content_length) {
    out += "Content-Length: ";
    out += std::to_string(*content_length);
    out += "\r\n";
  }
  out += "\r\n";
  return out;
}

// The status line and header the client receives, framed for it.
std::string client_response_head(const http::response_header<>& res, unsigned client_version, const HeaderNames& drop,
                                 const AppForward& how, bool chunked, std::optional<std::uint64_t> content_length,
                                 bool keep) {
  std::string out;
  out.reserve(512);
  append_status_line(out, client_version, res);
  append_end_to_end_fields(out, res, drop);
  out += how.response_headers;
  if (chunked) {
    out += "Transfer-Encoding: chunked\r\n";
  } else if (content_length) {
    out += "Content-Length: ";
    out += std::to_string(*content_length);
    out += "\r\n";
  }
  if (client_version >= 11 && !keep) out += "Connection: close\r\n";
  if (client_version < 11 && keep) out += "Connection: keep-alive\r\n";
  out += "\r\n";
  return out;
}

// One relay write's buffers: the head while it is unsent, then a piece of
// body, raw or as one chunk; the last piece of a chunked body also ends it.
class RelayPiece {
 public:
  RelayPiece(const std::string& head, bool chunked, net::const_buffer data, bool last) {
    if (!head.empty()) add(net::buffer(head));
    if (!chunked) {
      if (data.size() > 0) add(data);
      return;
    }
    if (data.size() > 0) {
      auto [end, ec] = std::to_chars(size_line_, size_line_ + sizeof size_line_ - 2, data.size(), 16);
      *end++ = '\r';
      *end++ = '\n';
      add(net::buffer(size_line_, static_cast<std::size_t>(end - size_line_)));
      add(data);
      add(last ? net::buffer("\r\n0\r\n\r\n", 7) : net::buffer("\r\n", 2));
    } else if (last) {
      add(net::buffer("0\r\n\r\n", 5));
    }
  }
  RelayPiece(const RelayPiece&) = delete;
  RelayPiece& operator=(const RelayPiece&) = delete;

  std::span<const net::const_buffer> buffers() const { return {buffers_.data(), count_}; }
  bool empty() const { return count_ == 0; }

 private:
  void add(net::const_buffer b) { buffers_[count_++] = b; }

  char size_line_[24];
  std::array<net::const_buffer, 4> buffers_;
  std::size_t count_ = 0;
};

}  // namespace

std::string response_head(const http::response_header<>& res) {
  std::string out;
  append_status_line(out, res.version(), res);
  for (const auto& field : res) append_field(out, field);
  out += "\r\n";
  return out;
}

awaitable<AppOutcome> AppUpstream::forward(beast::tcp_stream& client_stream, IoDeadline& client_deadline,
                                           beast::flat_buffer& client_buffer,
                                           http::request_parser<http::string_body>& parser, const AppForward& how) {
  tcp::socket& client = client_stream.socket();
  AppOutcome out;
  auto started = SteadyClock::now();
  auto elapsed = [&started] {
    return std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - started);
  };
  auto ex = client_stream.get_executor();
  Pool& pool = pool_for(ex);

  // The body is relayed, never buffered whole: max_body does not apply.
  http::request_parser<http::buffer_body> rp{std::move(parser)};
  rp.body_limit(boost::none);
  auto& req = rp.get();
  const unsigned client_version = req.version();
  const bool expect_continue = beast::iequals(req[http::field::expect], "100-continue");
  const bool chunked_in = rp.chunked();
  const bool has_body = !rp.is_done();
  out.request_body_read = !has_body;
  // The header goes out as the client sent it, minus what is hop-by-hop or
  // the gateway's to set; Expect is answered here, once the app is reachable;
  // a chunked body is re-chunked, so a Content-Length beside it goes.
  HeaderNames drop_request = how.drop_request;
  drop_request.add("Expect");
  std::optional<std::uint64_t> length_in;
  if (!chunked_in && rp.content_length()) length_in = *rp.content_length();
  const bool ipv6_literal = options_.host.find(':') != std::string::npos;
  const std::string app_host =
      (ipv6_literal ? "[" + options_.host + "]" : options_.host) + ":" + std::to_string(options_.port);

  // Only bodies that do not fit one read need the relay buffer.
  std::unique_ptr<char[]> relay;
  auto relay_buffer = [&relay] {
    if (!relay) relay = std::make_unique_for_overwrite<char[]>(kRelayChunk);
    return relay.get();
  };
  std::unique_ptr<Connection> conn;
  std::optional<http::response_parser<http::buffer_body>> resp;
  bool sent_continue = false;

  for (int attempt = 0;; ++attempt) {
    conn.reset();
    while (!pool.idle.empty()) {
      auto candidate = std::move(pool.idle.back());
      pool.idle.pop_back();
      if (looks_alive(candidate->stream.socket(), candidate->buffer)) {
        conn = std::move(candidate);
        break;
      }
    }
    if (!conn) {
      conn = std::make_unique<Connection>(ex);
      beast::error_code ec;
      auto address = net::ip::make_address(options_.host, ec);
      std::vector<tcp::endpoint> endpoints;
      if (!ec) {
        endpoints.emplace_back(address, options_.port);
      } else {
        tcp::resolver resolver(ex);
        std::string service = std::to_string(options_.port);  // named: see the g++ 12 note in server.cpp
        auto [rec, results] = co_await resolver.async_resolve(options_.host, service, as_tuple);
        if (rec) {
          out.failure = AppOutcome::Failure::unreachable;
          out.detail = "cannot resolve " + options_.host + ": " + rec.message();
          out.upstream_time = elapsed();
          co_return out;
        }
        for (const auto& r : results) endpoints.push_back(r.endpoint());
      }
      conn->stream.expires_after(options_.connect_timeout);
      auto [cec, ep] = co_await conn->stream.async_connect(endpoints, as_tuple);
      if (cec) {
        out.failure = is_timeout(cec) ? AppOutcome::Failure::timeout : AppOutcome::Failure::unreachable;
        out.detail = "connecting: " + cec.message();
        out.upstream_time = elapsed();
        co_return out;
      }
      conn->stream.socket().set_option(tcp::no_delay(true), ec);
    }

    // The client sends its body only now that the app is known to be there.
    if (expect_continue && has_body && !sent_continue) {
      sent_continue = true;
      http::response<http::empty_body> cont{http::status::continue_, client_version};
      client_stream.expires_after(how.client_write_timeout);
      auto [ec, n] = co_await http::async_write(client_stream, cont, as_tuple);
      if (ec) {
        out.failure = AppOutcome::Failure::client_gone;
        out.upstream_time = elapsed();
        co_return out;
      }
    }

    // Request: the header, then a bounded piece of the client's body at a
    // time, each written before the next is read (Beast's relay pattern).
    std::string head = request_head(req, drop_request, how, chunked_in, length_in, app_host);
    beast::error_code upstream_ec;
    for (;;) {
      std::size_t got = 0;
      if (!rp.is_done()) {
        char* buf = relay_buffer();
        req.body().data = buf;
        req.body().size = kRelayChunk;
        client_deadline.arm(how.client_read_timeout);
        auto [read_ec, n] = co_await http::async_read(client, client_buffer, rp, as_tuple);
        auto ec = client_deadline.outcome(read_ec);
        if (ec == http::error::need_buffer) ec = {};
        if (ec) {
          // A broken chunk is the client's fault and gets an answer; the app
          // connection, holding part of a request, is dropped with `conn`.
          const bool malformed = ec.category() == http::make_error_code(http::error::bad_chunk).category() &&
                                 ec != http::error::end_of_stream && ec != http::error::partial_message;
          out.failure = malformed ? AppOutcome::Failure::bad_request : AppOutcome::Failure::client_gone;
          out.detail = "reading the request body: " + ec.message();
          out.upstream_time = elapsed();
          co_return out;
        }
        got = kRelayChunk - req.body().size;
      }
      const bool last = rp.is_done();
      RelayPiece piece(head, chunked_in, net::buffer(relay.get(), got), last);
      if (!piece.empty()) {
        conn->deadline.arm(options_.idle_timeout);
        auto [ec, n] = co_await net::async_write(conn->stream.socket(), piece.buffers(), as_tuple);
        if (ec) {
          upstream_ec = conn->deadline.outcome(ec);
          break;
        }
      }
      head.clear();
      if (last) break;
    }
    out.request_body_read = rp.is_done();

    // Response header: the app's first byte, past any interim 1xx.
    if (!upstream_ec) {
      for (int interim = 0;; ++interim) {
        resp.emplace();
        resp->body_limit(boost::none);
        if (req.method() == http::verb::head) resp->skip(true);
        conn->deadline.arm(options_.first_byte_timeout);
        // A client that hangs up meanwhile is gone (499), not a slow app (504).
        auto first = co_await (http::async_read_header(conn->stream.socket(), conn->buffer, *resp, as_tuple) ||
                               until_client_leaves(client));
        if (first.index() == 1 && std::get<1>(first)) {
          out.failure = AppOutcome::Failure::client_gone;
          out.detail = "the client left before the app answered";
          out.upstream_time = elapsed();
          co_return out;
        }
        auto [ec, n] = first.index() == 0
                           ? std::get<0>(first)
                           : std::tuple(beast::error_code(net::error::operation_aborted), std::size_t{0});
        if (ec) {
          upstream_ec = conn->deadline.outcome(ec);
          break;
        }
        if (resp->get().result_int() / 100 != 1) break;
        if (resp->get().result() == http::status::switching_protocols || interim >= kMaxInterimResponses) {
          upstream_ec = http::error::bad_status;  // Upgrade was stripped: the app must not switch
          break;
        }
      }
    }
    if (!upstream_ec) break;
    if (attempt == 0 && conn->reused && !has_body && is_stale_connection(upstream_ec)) continue;
    out.failure = is_timeout(upstream_ec) ? AppOutcome::Failure::timeout
                  : upstream_ec.category() == beast::error_code(http::error::bad_status).category()
                      ? AppOutcome::Failure::malformed
                      : AppOutcome::Failure::unreachable;
    out.detail = "waiting for the response: " + upstream_ec.message();
    out.upstream_time = elapsed();
    co_return out;
  }

  // Response: re-framed for the client, then relayed piece by piece.
  auto& res = resp->get();
  const bool upstream_keep = resp->keep_alive();
  const bool chunked_up = resp->chunked();
  const bool length_framed = !chunked_up && resp->content_length().has_value();
  const bool bodyless = resp->is_done();  // HEAD, 204, 304, or an empty body
  bool keep = how.client_keep_alive;
  // Chunked (or close-delimited) from the app: chunked keeps an HTTP/1.1
  // client's connection; an HTTP/1.0 client reads to the close.
  bool chunked_out = false;
  if (!bodyless && !length_framed) {
    if (client_version >= 11) {
      chunked_out = true;
    } else {
      keep = false;
    }
  }
  // The client's framing is the gateway's: the length the parser read (for a
  // HEAD or 304, the length the app declared), else chunked or close.
  std::optional<std::uint64_t> length_out;
  if (!chunked_out && !chunked_up && res.result() != http::status::no_content && res.result_int() / 100 != 1) {
    if (resp->content_length()) length_out = *resp->content_length();
  }
  std::string head = client_response_head(res, client_version, how.drop_response, how, chunked_out, length_out, keep);
  out.status = res.result_int();

  // Only a connection whose answer was read exactly to its end goes back.
  auto release = [&] {
    if (upstream_keep && conn->buffer.size() == 0 && pool.idle.size() < options_.max_idle_per_thread) {
      conn->stream.expires_never();
      conn->deadline.disarm();
      conn->reused = true;
      pool.idle.push_back(std::move(conn));
    }
  };

  // An answer whose body has already arrived whole goes out in one write.
  if (bodyless || (length_framed && *resp->content_length() <= conn->buffer.size())) {
    const auto body_size = bodyless ? std::size_t{0} : static_cast<std::size_t>(*resp->content_length());
    head.append(static_cast<const char*>(conn->buffer.data().data()), body_size);
    conn->buffer.consume(body_size);
    out.response_started = true;
    client_deadline.arm(how.client_write_timeout);
    auto [ec, n] = co_await net::async_write(client, net::buffer(head), as_tuple);
    out.upstream_time = elapsed();
    if (ec) {
      out.failure = AppOutcome::Failure::client_gone;
      co_return out;
    }
    out.keep_client = keep;
    release();
    co_return out;
  }

  if (conn->buffer.size() == 0) {
    // Nothing of the body has arrived yet: the client gets the header now,
    // not when the app's first chunk comes (a stream may start slowly).
    out.response_started = true;
    client_deadline.arm(how.client_write_timeout);
    auto [ec, n] = co_await net::async_write(client, net::buffer(head), as_tuple);
    if (ec) {
      out.failure = AppOutcome::Failure::client_gone;
      out.upstream_time = elapsed();
      co_return out;
    }
    head.clear();
  }
  for (;;) {
    std::size_t got = 0;
    if (!resp->is_done()) {
      char* buf = relay_buffer();
      res.body().data = buf;
      res.body().size = kRelayChunk;
      conn->deadline.arm(options_.idle_timeout);
      auto [read_ec, n] = co_await http::async_read(conn->stream.socket(), conn->buffer, *resp, as_tuple);
      auto ec = conn->deadline.outcome(read_ec);
      if (ec == http::error::need_buffer) ec = {};
      if (ec) {
        out.upstream_time = elapsed();
        out.detail = "reading the response: " + ec.message();
        if (!out.response_started) {
          out.failure = is_timeout(ec) ? AppOutcome::Failure::timeout : AppOutcome::Failure::unreachable;
        } else {
          out.failure = AppOutcome::Failure::broken_response;
        }
        co_return out;
      }
      got = kRelayChunk - res.body().size;
    }
    const bool last = resp->is_done();
    RelayPiece piece(head, chunked_out, net::buffer(relay.get(), got), last);
    out.response_started = true;
    if (!piece.empty()) {
      client_deadline.arm(how.client_write_timeout);
      auto [ec, n] = co_await net::async_write(client, piece.buffers(), as_tuple);
      if (ec) {
        out.failure = AppOutcome::Failure::client_gone;
        out.upstream_time = elapsed();
        co_return out;
      }
    }
    head.clear();
    if (last) break;
  }

  out.upstream_time = elapsed();
  out.keep_client = keep;
  release();
  co_return out;
}

}  // namespace tollgate::proxy
