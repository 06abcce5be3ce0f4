#include "gateway/http_rules.hpp"

#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <catch2/catch.hpp>

namespace http = boost::beast::http;
using tollgate::gateway::check_request_head;
using tollgate::gateway::holds_tollgate_key;
using tollgate::gateway::is_public_path;
using tollgate::gateway::origin_form;
using tollgate::gateway::target_path;

namespace {

// The status check_request_head gives the head in `text` (0: accepted);
// -1 when Beast's parser itself refuses it.
int verdict(const std::string& text) {
  http::request_parser<http::string_body> parser;
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(text), ec);
  if (ec && ec != http::error::need_more) return -1;
  if (!parser.is_header_done()) return -1;
  auto violation = check_request_head(parser.get());
  return violation ? violation->status : 0;
}

}  // namespace

TEST_CASE("request heads: framing, Host and target rules", "[gateway][http_rules]") {
  CHECK(verdict("GET / HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(verdict("GET / HTTP/1.0\r\n\r\n") == 0);
  CHECK(verdict("GET / HTTP/1.1\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: a b\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n") == 0);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: u@h\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/2.0\r\nHost: h\r\n\r\n") == -1);  // Beast's own 400
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n") == 0);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n") == 0);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n") == 400);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n") == 400);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n") == 501);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n") == 400);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,\r\n\r\n") == 400);
  CHECK(verdict("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: ,\r\n\r\n") == 400);
  CHECK(verdict("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: h\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: h\r\nx-api-key: a\r\nX-API-Key: b\r\n\r\n") == 400);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n") == 0);
  CHECK(verdict("GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue, x\r\n\r\n") == 417);
  CHECK(verdict("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n") == 405);
  CHECK(verdict("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(verdict("GET * HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
  CHECK(verdict("GET http://h/a?b HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(verdict("GET HTTP://H/a HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(verdict("GET http://x/a HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
  CHECK(verdict("GET http://h HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
  CHECK(verdict("GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
  CHECK(verdict("GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
  CHECK(verdict("GET a HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
}

TEST_CASE("request targets: the path routes, the origin form is forwarded", "[gateway][http_rules]") {
  CHECK(target_path("/v1/models?x=1") == "/v1/models");
  CHECK(target_path("http://h:80/admin/keys?x") == "/admin/keys");
  CHECK(origin_form("https://h/a/b?c") == "/a/b?c");
  CHECK(origin_form("/a") == "/a");
  CHECK(origin_form("*") == "*");
}

TEST_CASE("public paths: literal or prefix, never a path the app could normalise elsewhere", "[gateway][http_rules]") {
  std::vector<std::string> patterns = {"/actuator/health", "/public/*"};
  CHECK(is_public_path(patterns, "/actuator/health"));
  CHECK_FALSE(is_public_path(patterns, "/actuator/health/x"));
  CHECK(is_public_path(patterns, "/public/a/b.css"));
  CHECK(is_public_path(patterns, "/public/.well-known"));
  CHECK_FALSE(is_public_path(patterns, "/public/../private"));
  CHECK_FALSE(is_public_path(patterns, "/public/./x"));
  CHECK_FALSE(is_public_path(patterns, "/public/.."));
  CHECK_FALSE(is_public_path(patterns, "/public/..;/private"));
  CHECK_FALSE(is_public_path(patterns, "/public/%2e%2e/private"));
  CHECK_FALSE(is_public_path(patterns, "/public//x"));
  CHECK_FALSE(is_public_path(patterns, "/public\\..\\x"));
  CHECK_FALSE(is_public_path(patterns, "/publicx"));
}

TEST_CASE("Tollgate keys are found wherever they sit in a header value", "[gateway][http_rules]") {
  const std::string key = "tg-0123456789abcdefABCDEFghijklmnop";
  CHECK(holds_tollgate_key("Bearer " + key));
  CHECK(holds_tollgate_key("a=1; tg=" + key + "; b=2"));
  CHECK(holds_tollgate_key("TG-0123456789ABCDEFxyz"));
  CHECK(holds_tollgate_key("tg-admin-0123456789abcdefXYZ"));
  CHECK_FALSE(holds_tollgate_key("tg-short"));
  CHECK_FALSE(holds_tollgate_key("Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"));
  CHECK_FALSE(holds_tollgate_key("tg-"));
  CHECK(holds_tollgate_key("opaque-secret-123", "secret"));
  CHECK_FALSE(holds_tollgate_key("opaque", ""));
}
