// Hop-by-hop header removal for the app reverse proxy (RFC 9110 §7.6.1).
#include <catch2/catch.hpp>

#include "backends/http_upstream.hpp"

namespace http = boost::beast::http;

TEST_CASE("strip_hop_by_hop removes the fixed set and what Connection names", "[backends][app_proxy]") {
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
  f.set("Content-Length", "5");
  tollgate::backends::strip_hop_by_hop(f);

  std::vector<std::string> left;
  for (const auto& field : f) left.emplace_back(field.name_string());
  CHECK(left == std::vector<std::string>{"Host", "X-Between", "Authorization", "Content-Length"});
}
