// Hop-by-hop header removal for the app reverse proxy (RFC 9110 §7.6.1).
#include "gateway/proxy/app_upstream.hpp"

#include <catch2/catch.hpp>

namespace http = boost::beast::http;

TEST_CASE("end-to-end fields leave out the fixed hop-by-hop set, what Connection names, and what is dropped",
          "[proxy][app_proxy]") {
  http::fields f;
  f.set("Host", "app");
  f.insert("Connection", "keep-alive, X-Hop-One");
  f.set("X-Between", "stays");
  f.insert("connection", "x-hop-two");
  f.set("X-Hop-One", "1");
  f.set("X-Hop-Two", "2");
  for (auto name : {"Keep-Alive", "Proxy-Connection", "TE", "Transfer-Encoding", "Upgrade", "Proxy-Authorization",
                    "Proxy-Authenticate", "Trailer"}) {
    f.set(name, "x");
  }
  f.set("Authorization", "Basic abc");
  f.set("X-Tollgate-User", "mallory");
  f.set("Content-Length", "5");
  tollgate::proxy::HeaderNames drop;
  drop.add("x-tollgate-user");

  std::string wire;
  tollgate::proxy::append_end_to_end_fields(wire, f, drop);
  // Content-Length goes too: the gateway writes the framing it read itself.
  CHECK(wire == "Host: app\r\nX-Between: stays\r\nAuthorization: Basic abc\r\n");
}

TEST_CASE("Connection cannot name Host or the framing headers away", "[proxy][app_proxy]") {
  http::fields f;
  f.set("Host", "app");
  f.insert("Connection", "Host, content-length, Transfer-Encoding, X-Gone");
  f.set("X-Gone", "1");
  f.set("X-Kept", "2");
  std::string wire;
  tollgate::proxy::append_end_to_end_fields(wire, f, {});
  CHECK(wire == "Host: app\r\nX-Kept: 2\r\n");
}

TEST_CASE("a header line set by the gateway cannot be split by its value", "[proxy][app_proxy]") {
  tollgate::proxy::AppForward how;
  how.set_request_header("X-Tollgate-User", std::string_view("eve\r\nX-Admin: yes\0", 18));
  CHECK(how.request_headers == "X-Tollgate-User: eve  X-Admin: yes \r\n");
  CHECK(how.drop_request.contains("x-tollgate-user"));
  CHECK_FALSE(how.drop_request.contains("X-Tollgate-Key-Id"));
}
