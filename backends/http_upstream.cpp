#include "backends/http_upstream.hpp"

#include <sys/socket.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <optional>

namespace tollgate::backends {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using net::awaitable;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

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

}  // namespace

struct AppUpstream::Connection {
  explicit Connection(const net::any_io_executor& ex) : stream(ex) {}
  beast::tcp_stream stream;
  beast::flat_buffer buffer;
  bool reused = false;
  SteadyClock::time_point released{};
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

void strip_hop_by_hop(http::fields& fields) {
  // Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1).
  std::vector<std::string> named;
  // Not equal_range: Beast walks insertion order from the first match to the
  // last, taking in whatever other headers lie between.
  for (const auto& f : fields) {
    if (f.name() != http::field::connection) continue;
    for (auto token : http::token_list(f.value())) named.emplace_back(token);
  }
  for (const auto& name : named) fields.erase(name);
  for (auto f : {http::field::connection, http::field::keep_alive, http::field::proxy_connection, http::field::te,
                 http::field::transfer_encoding, http::field::upgrade, http::field::proxy_authorization,
                 http::field::proxy_authenticate, http::field::trailer}) {
    fields.erase(f);
  }
}

namespace {

// A connection back in the pool this recently is trusted without a look:
// apps keep idle connections for seconds (nginx 75 s, Tomcat 20 s), and a
// body-less request that meets a closed one is retried anyway.
constexpr auto kTrustedIdle = std::chrono::seconds(1);

// A kept-alive connection the app has closed is readable (EOF) or reset; a
// live one has nothing to read. A peek without blocking tells them apart.
bool looks_alive(tcp::socket& socket, const beast::flat_buffer& leftover, SteadyClock::time_point released) {
  if (leftover.size() > 0) return false;  // bytes nobody asked for: the framing is off
  if (SteadyClock::now() - released < kTrustedIdle) return true;
  char byte;
  auto n = ::recv(socket.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

// Header fields as they go on the wire, each line ending in CRLF.
void append_fields(std::string& out, const http::fields& fields) {
  for (const auto& field : fields) {
    auto name = field.name_string();
    auto value = field.value();
    out.append(name.data(), name.size());
    out += ": ";
    out.append(value.data(), value.size());
    out += "\r\n";
  }
  out += "\r\n";
}

// Beast's buffer_body serializers cost tens of thousands of instructions per
// small message (callgrind); a header without a body to relay is framed here.
std::string request_head(const http::request_header<>& req) {
  std::string out;
  auto method = req.method_string();
  auto target = req.target();
  out.append(method.data(), method.size());
  out += ' ';
  out.append(target.data(), target.size());
  out += req.version() == 10 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n";
  append_fields(out, req);
  return out;
}

}  // namespace

std::string response_head(const http::response_header<>& res) {
  std::string out = res.version() == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
  out += std::to_string(res.result_int());
  out += ' ';
  auto reason = res.reason();
  out.append(reason.data(), reason.size());
  out += "\r\n";
  append_fields(out, res);
  return out;
}

awaitable<AppOutcome> AppUpstream::forward(beast::tcp_stream& client, beast::flat_buffer& client_buffer,
                                           http::request_parser<http::string_body>& parser, const AppForward& how) {
  AppOutcome out;
  auto started = SteadyClock::now();
  auto elapsed = [&started] {
    return std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - started);
  };
  auto ex = client.get_executor();
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
  strip_hop_by_hop(req);
  req.erase(http::field::expect);  // answered here, once the app is reachable
  for (const auto& f : how.add_request_headers) req.set(f.name_string(), f.value());
  req.version(11);
  if (chunked_in) {
    req.erase(http::field::content_length);
    req.chunked(true);
  }

  auto buf = std::make_unique_for_overwrite<char[]>(kRelayChunk);
  std::unique_ptr<Connection> conn;
  std::optional<http::response_parser<http::buffer_body>> resp;
  bool sent_continue = false;

  for (int attempt = 0;; ++attempt) {
    conn.reset();
    while (!pool.idle.empty()) {
      auto candidate = std::move(pool.idle.back());
      pool.idle.pop_back();
      if (looks_alive(candidate->stream.socket(), candidate->buffer, candidate->released)) {
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
      client.expires_after(how.client_write_timeout);
      auto [ec, n] = co_await http::async_write(client, cont, as_tuple);
      if (ec) {
        out.failure = AppOutcome::Failure::client_gone;
        out.upstream_time = elapsed();
        co_return out;
      }
    }

    // Request: read a bounded piece of the client's body, write it to the app,
    // repeat (Beast's relay pattern).
    http::request_serializer<http::buffer_body> sr{req};
    beast::error_code upstream_ec;
    if (!has_body) {
      std::string head = request_head(req);
      conn->stream.expires_after(options_.idle_timeout);
      auto [ec, n] = co_await net::async_write(conn->stream, net::buffer(head), as_tuple);
      upstream_ec = ec;
    } else
      do {
        if (!rp.is_done()) {
          req.body().data = buf.get();
          req.body().size = kRelayChunk;
          client.expires_after(how.client_read_timeout);
          auto [ec, n] = co_await http::async_read(client, client_buffer, rp, as_tuple);
          if (ec == http::error::need_buffer) ec = {};
          if (ec) {
            out.failure = AppOutcome::Failure::client_gone;
            out.detail = "reading the request body: " + ec.message();
            out.upstream_time = elapsed();
            co_return out;
          }
          req.body().size = kRelayChunk - req.body().size;
          req.body().data = buf.get();
          req.body().more = !rp.is_done();
        } else {
          req.body().data = nullptr;
          req.body().size = 0;
          req.body().more = false;
        }
        conn->stream.expires_after(options_.idle_timeout);
        auto [ec, n] = co_await http::async_write(conn->stream, sr, as_tuple);
        if (ec == http::error::need_buffer) ec = {};
        if (ec) {
          upstream_ec = ec;
          break;
        }
      } while (!rp.is_done() && !sr.is_done());
    out.request_body_read = rp.is_done();

    // Response header: the app's first byte, past any interim 1xx.
    if (!upstream_ec) {
      for (int interim = 0;; ++interim) {
        resp.emplace();
        resp->body_limit(boost::none);
        if (req.method() == http::verb::head) resp->skip(true);
        conn->stream.expires_after(options_.first_byte_timeout);
        auto [ec, n] = co_await http::async_read_header(conn->stream, conn->buffer, *resp, as_tuple);
        if (ec) {
          upstream_ec = ec;
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
    out.failure = is_timeout(upstream_ec) ? AppOutcome::Failure::timeout : AppOutcome::Failure::unreachable;
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
  strip_hop_by_hop(res);
  for (const auto& f : how.add_response_headers) res.set(f.name_string(), f.value());
  res.version(client_version);
  bool keep = how.client_keep_alive;
  if (chunked_up) res.erase(http::field::content_length);
  if (!bodyless && !length_framed) {
    // Chunked (or close-delimited) from the app: chunked keeps an HTTP/1.1
    // client's connection; an HTTP/1.0 client reads to the close.
    if (client_version >= 11) {
      res.chunked(true);
    } else {
      keep = false;
    }
  }
  res.keep_alive(keep);
  out.status = res.result_int();

  auto release = [&] {
    if (upstream_keep && pool.idle.size() < options_.max_idle_per_thread) {
      conn->stream.expires_never();
      conn->reused = true;
      conn->released = SteadyClock::now();
      pool.idle.push_back(std::move(conn));
    }
  };

  // An answer whose body has already arrived whole goes out in one write.
  if (bodyless || (length_framed && *resp->content_length() <= conn->buffer.size())) {
    const auto body_size = bodyless ? std::size_t{0} : static_cast<std::size_t>(*resp->content_length());
    std::string wire = response_head(res);
    wire.append(static_cast<const char*>(conn->buffer.data().data()), body_size);
    conn->buffer.consume(body_size);
    out.response_started = true;
    client.expires_after(how.client_write_timeout);
    auto [ec, n] = co_await net::async_write(client, net::buffer(wire), as_tuple);
    out.upstream_time = elapsed();
    if (ec) {
      out.failure = AppOutcome::Failure::client_gone;
      co_return out;
    }
    out.keep_client = keep;
    release();
    co_return out;
  }

  http::response_serializer<http::buffer_body> csr{res};
  if (!bodyless && conn->buffer.size() == 0) {
    // Nothing of the body has arrived yet: the client gets the header now,
    // not when the app's first chunk comes (a stream may start slowly).
    out.response_started = true;
    client.expires_after(how.client_write_timeout);
    auto [ec, n] = co_await http::async_write_header(client, csr, as_tuple);
    if (ec) {
      out.failure = AppOutcome::Failure::client_gone;
      out.upstream_time = elapsed();
      co_return out;
    }
  }
  do {
    if (!resp->is_done()) {
      res.body().data = buf.get();
      res.body().size = kRelayChunk;
      conn->stream.expires_after(options_.idle_timeout);
      auto [ec, n] = co_await http::async_read(conn->stream, conn->buffer, *resp, as_tuple);
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
      res.body().size = kRelayChunk - res.body().size;
      res.body().data = buf.get();
      res.body().more = !resp->is_done();
    } else {
      res.body().data = nullptr;
      res.body().size = 0;
      res.body().more = false;
    }
    out.response_started = true;
    client.expires_after(how.client_write_timeout);
    auto [ec, n] = co_await http::async_write(client, csr, as_tuple);
    if (ec == http::error::need_buffer) ec = {};
    if (ec) {
      out.failure = AppOutcome::Failure::client_gone;
      out.upstream_time = elapsed();
      co_return out;
    }
  } while (!resp->is_done() && !csr.is_done());

  out.upstream_time = elapsed();
  out.keep_client = keep;
  if (resp->is_done()) release();
  co_return out;
}

}  // namespace tollgate::backends
