// The gateway's request path on untrusted bytes: Beast's parser fed in pieces
// with the gateway's limits (gateway/server.cpp Session::run), the request-head
// rules (gateway/http_rules.hpp), the switch to a buffer_body relay for the
// app proxy (gateway/proxy/app_upstream.cpp forward), and the forwarded head
// (append_end_to_end_fields). With the first byte's top
// bit set, the input is the app's response instead, written back by
// response_head. Input: one byte choosing modes and piece sizes, then the message.
#include <algorithm>
#include <array>
#include <boost/asio/buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http.hpp>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "gateway/proxy/app_upstream.hpp"
#include "gateway/http_rules.hpp"

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace proxy = tollgate::proxy;
namespace gateway = tollgate::gateway;

// gateway/config.hpp ServerLimits defaults.
constexpr std::size_t kMaxHeader = 16 * 1024;
constexpr std::size_t kMaxBody = 4 * 1024 * 1024;
// Smaller than the proxy's 64 KiB relay piece so fuzz-sized bodies take several.
constexpr std::size_t kRelayPiece = 7;

// Read sizes cycle through two lengths chosen by the control byte: one byte at
// a time through a whole small header at once.
class Pieces {
 public:
  Pieces(std::uint8_t control, std::string_view bytes)
      : sizes_{1u + (control & 0x0fu), 1u + ((control >> 4) & 0x07u) * 37u}, rest_(bytes) {}
  bool empty() const { return rest_.empty(); }
  // The next read's worth, appended to what the parser left unconsumed.
  void read_into(std::string& pending) {
    std::size_t n = std::min(sizes_[turn_++ % sizes_.size()], rest_.size());
    pending.append(rest_.substr(0, n));
    rest_.remove_prefix(n);
  }

 private:
  std::array<std::size_t, 2> sizes_;
  std::size_t turn_ = 0;
  std::string_view rest_;
};

// A forwarded head must be "Name: value\r\n" lines only: a CR or LF anywhere
// else would let a client write its own headers (or a second request) to the
// app. None may be hop-by-hop or one the gateway drops.
void check_wire_lines(std::string_view head, const proxy::HeaderNames& forbidden) {
  while (!head.empty()) {
    auto end = head.find("\r\n");
    if (end == std::string_view::npos) std::abort();
    auto line = head.substr(0, end);
    if (line.find_first_of("\r\n") != std::string_view::npos) std::abort();
    auto colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) std::abort();
    if (forbidden.contains(line.substr(0, colon))) std::abort();
    head.remove_prefix(end + 2);
  }
}

// Whether wire lines checked by check_wire_lines hold a field named `name`.
bool has_field(std::string_view head, std::string_view name) {
  for (std::size_t at = 0; at < head.size(); at = head.find("\r\n", at) + 2) {
    auto line = head.substr(at);
    if (line.size() > name.size() && line[name.size()] == ':' && beast::iequals(line.substr(0, name.size()), name)) {
      return true;
    }
  }
  return false;
}

// Hop-by-hop, and the framing the gateway writes itself.
proxy::HeaderNames hop_by_hop() {
  proxy::HeaderNames names;
  for (auto name : {"Connection", "Keep-Alive", "Proxy-Connection", "TE", "Transfer-Encoding", "Upgrade",
                    "Proxy-Authorization", "Proxy-Authenticate", "Trailer", "Content-Length"}) {
    names.add(name);
  }
  return names;
}

// Parses the header the way Session::run does: Beast applies header_limit to
// each put(), so the gateway shrinks it as the header is consumed.
template <class Parser>
bool parse_header(Parser& parser, Pieces& input, std::string& pending) {
  std::size_t header_bytes = 0;
  beast::error_code ec;
  while (!parser.is_header_done()) {
    if (input.empty() && pending.empty()) return false;
    if (!input.empty()) input.read_into(pending);
    parser.header_limit(static_cast<std::uint32_t>(kMaxHeader - header_bytes));
    std::size_t used = parser.put(net::buffer(pending), ec);
    pending.erase(0, used);
    header_bytes += used;
    if (ec == http::error::need_more) {
      if (header_bytes >= kMaxHeader) return false;
      if (input.empty()) return false;  // the client went away mid-header
      continue;
    }
    if (ec) return false;
  }
  return true;
}

// Feeds the body to `parser` a read at a time until it is done, the input
// ends (a close-delimited body ends there) or the parser fails. `fresh` is
// called before each put: the relay resets its buffer_body there.
template <class Parser, class Fresh>
bool feed_body(Parser& parser, Pieces& input, std::string& pending, Fresh&& fresh) {
  bool want_more = pending.empty();
  while (!parser.is_done()) {
    if (want_more) {
      if (input.empty()) {
        beast::error_code ec;
        parser.put_eof(ec);
        return !ec && parser.is_done();
      }
      input.read_into(pending);
    }
    fresh();
    beast::error_code ec;
    std::size_t used = parser.put(net::buffer(pending), ec);
    pending.erase(0, used);
    if (ec == http::error::need_buffer) ec = {};  // the relay piece is full
    want_more = ec == http::error::need_more || pending.empty() || used == 0;
    if (ec == http::error::need_more) ec = {};
    if (ec) return false;
  }
  return true;
}

// The app proxy's relay (AppUpstream::forward): a small buffer_body piece at a time.
bool relay_body(http::request_parser<http::buffer_body>& rp, Pieces& input, std::string& pending) {
  std::array<char, kRelayPiece> piece;
  std::size_t relayed = 0;
  std::size_t offered = 0;
  auto& body = rp.get().body();
  auto fresh = [&] {
    if (body.data) relayed += offered - body.size;
    body.data = piece.data();
    body.size = offered = piece.size();
  };
  body.data = nullptr;
  bool done = feed_body(rp, input, pending, fresh);
  if (body.data) relayed += offered - body.size;
  if (done && !rp.chunked() && rp.content_length() && relayed != *rp.content_length()) std::abort();
  return done;
}

// The gateway's own routes read the body whole, capped at max_body; a
// Content-Length past it is a 413 before anything is read (Session::handle).
bool read_string_body(http::request_parser<http::string_body>& parser, Pieces& input, std::string& pending) {
  parser.body_limit(kMaxBody);
  if (parser.content_length() && *parser.content_length() > kMaxBody) return false;
  bool done = feed_body(parser, input, pending, [] {});
  if (done && parser.content_length() && parser.get().body().size() != *parser.content_length()) std::abort();
  return done;
}

// One request as the gateway handles it; true when the connection could
// carry another (the body read to its end, keep-alive).
bool fuzz_request(std::uint8_t control, Pieces& input, std::string& pending) {
  http::request_parser<http::string_body> parser;
  parser.body_limit(boost::none);  // as Session::run: handle() caps its own routes
  if (!parse_header(parser, input, pending)) return false;

  // A head the rules refuse is answered and the connection closed (Session::run).
  if (gateway::check_request_head(parser.get())) return false;

  const auto& req = parser.get();
  const bool keep_alive = req.keep_alive();
  if (req.version() != 10 && req.version() != 11) std::abort();
  const auto target = gateway::origin_form({req.target().data(), req.target().size()});
  if (target != "*" && !target.starts_with('/')) std::abort();
  gateway::is_public_path({"/public/*", "/health"}, gateway::target_path(target));

  // As handle_app: identity headers and every header holding a key go.
  proxy::HeaderNames drop;
  drop.add("Expect");
  drop.add("X-Tollgate-User");
  drop.add("X-Tollgate-Key-Id");
  bool has_host = false;
  for (const auto& f : req) {
    auto value = f.value();
    has_host = has_host || f.name() == http::field::host;
    if (gateway::holds_tollgate_key({value.data(), value.size()})) {
      auto name = f.name_string();
      drop.add({name.data(), name.size()});
    }
  }
  std::string head;
  proxy::append_end_to_end_fields(head, req, drop);
  check_wire_lines(head, hop_by_hop());
  check_wire_lines(head, drop);
  // Connection may never name Host away.
  if (has_host && !drop.contains("Host") && !has_field(head, "Host")) std::abort();

  if (control & 0x40) return read_string_body(parser, input, pending) && keep_alive;
  http::request_parser<http::buffer_body> rp{std::move(parser)};
  rp.body_limit(boost::none);
  return relay_body(rp, input, pending) && keep_alive;
}

void fuzz_response(Pieces& input, std::string& pending) {
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  if (!parse_header(parser, input, pending)) return;
  const auto& res = parser.get();
  std::string head = proxy::response_head(res);
  auto status_end = head.find("\r\n");
  if (status_end == std::string::npos || !head.ends_with("\r\n\r\n")) std::abort();
  check_wire_lines(std::string_view(head).substr(status_end + 2, head.size() - status_end - 4), {});
  std::string forwarded;
  proxy::append_end_to_end_fields(forwarded, res, {});
  check_wire_lines(forwarded, hop_by_hop());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t control = data[0];
  Pieces input(control, std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
  std::string pending;
  if (control & 0x80) {
    fuzz_response(input, pending);
    return 0;
  }
  // Pipelined requests on one connection, as Session::run loops.
  for (int i = 0; i < 4 && (!pending.empty() || !input.empty()); ++i) {
    if (!fuzz_request(control, input, pending)) break;
  }
  return 0;
}
