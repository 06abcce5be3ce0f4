// A chunked request body as the app proxy relays it: a fixed, valid head with
// Transfer-Encoding: chunked, then the input as the body, fed to Beast's
// parser in small reads while a small buffer_body takes the decoded bytes
// (AppUpstream::forward in gateway/proxy/app_upstream.cpp). Input: one byte
// choosing the read and relay sizes, then the body.
#include <algorithm>
#include <boost/asio/buffer.hpp>
#include <boost/beast/http.hpp>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;

constexpr std::string_view kHead =
    "POST /upload HTTP/1.1\r\nHost: app.internal\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t read_size = 1 + (data[0] & 0x1f);
  const std::size_t relay_size = 1 + (data[0] >> 5) * 3;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);

  http::request_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);  // relayed, never buffered whole
  constexpr std::uint64_t kMaxTotal = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t chunk_total = 0;
  auto on_header = [&chunk_total](std::uint64_t chunk_size, beast::string_view extensions, beast::error_code& ec) {
    // Saturating: two chunks may declare more than 2^64 bytes between them.
    chunk_total = chunk_size > kMaxTotal - chunk_total ? kMaxTotal : chunk_total + chunk_size;
    http::chunk_extensions ext;
    ext.parse(extensions, ec);
    if (!ec) {
      for (const auto& [name, value] : ext) {
        if (name.empty()) std::abort();
        (void)value;
      }
    }
    ec = {};  // the proxy ignores extensions: a bad one is not an error there
  };
  parser.on_chunk_header(on_header);

  beast::error_code ec;
  std::size_t used = parser.put(net::buffer(kHead.data(), kHead.size()), ec);
  if (ec || used != kHead.size() || !parser.is_header_done() || !parser.chunked()) std::abort();

  std::vector<char> relay(relay_size);
  std::string pending;
  std::size_t relayed = 0;
  bool want_more = true;
  while (!parser.is_done()) {
    if (want_more) {
      if (rest.empty()) break;  // the client stopped mid-body: the proxy gives up
      std::size_t n = std::min(read_size, rest.size());
      pending.append(rest.substr(0, n));
      rest.remove_prefix(n);
    }
    auto& body = parser.get().body();
    body.data = relay.data();
    body.size = relay.size();
    used = parser.put(net::buffer(pending), ec);
    pending.erase(0, used);
    relayed += relay.size() - body.size;
    if (ec == http::error::need_buffer) ec = {};
    want_more = ec == http::error::need_more || pending.empty() || used == 0;
    if (ec == http::error::need_more) ec = {};
    if (ec) break;
  }
  // Decoded bytes come only from chunk data, never more than the chunks declared.
  if (relayed > chunk_total || relayed > size) std::abort();
  if (parser.is_done() && relayed != chunk_total) std::abort();
  return 0;
}
