#include "gateway/app_forwarding.hpp"

#include <boost/beast/http/empty_body.hpp>
#include <catch2/catch.hpp>

using namespace tollgate;
using namespace tollgate::gateway;
namespace http = boost::beast::http;

namespace {

constexpr std::string_view kKey = "tg-AbCdEfGhIjKlMnOpQrStUv012345";

http::request<http::empty_body> request(std::string target = "/app/x") {
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, "app.example");
  return req;
}

bool has_line(const std::string& lines, std::string_view line) {
  return lines.find(std::string(line) + "\r\n") != std::string::npos;
}

AppCaller alice() { return {"alice", "tg-AbCd", kKey}; }

}  // namespace

TEST_CASE("app forwarding: the identity comes only from the gateway", "[gateway][app]") {
  auto req = request();
  req.set("X-Tollgate-User", "admin");
  req.set("X-Tollgate-Key-Id", "forged");
  SECTION("a keyed path sets both from the caller, replacing the client's") {
    proxy::AppForward how;
    REQUIRE_FALSE(plan_app_request(req, alice(), "127.0.0.1", false, how));
    CHECK(has_line(how.request_headers, "X-Tollgate-User: alice"));
    CHECK(has_line(how.request_headers, "X-Tollgate-Key-Id: tg-AbCd"));
    CHECK(how.drop_request.contains("X-Tollgate-User"));  // the client's copy is replaced
  }
  SECTION("a public path drops both") {
    proxy::AppForward how;
    REQUIRE_FALSE(plan_app_request(req, std::nullopt, "127.0.0.1", false, how));
    CHECK(how.drop_request.contains("x-tollgate-user"));
    CHECK(how.drop_request.contains("X-Tollgate-Key-Id"));
    CHECK(how.request_headers.find("X-Tollgate-User") == std::string::npos);
  }
}

TEST_CASE("app forwarding: every header holding a Tollgate key is dropped whole", "[gateway][app]") {
  auto req = request();
  req.set(http::field::authorization, "Bearer " + std::string(kKey));
  req.set(http::field::cookie, "session=abc; tg=" + std::string(kKey));
  req.set("X-Other", "tg-ZZZZZZZZZZZZZZZZZZZZ");  // another key's shape
  req.set("X-Plain", "tg-short");                 // too short to be a key
  proxy::AppForward how;
  REQUIRE_FALSE(plan_app_request(req, alice(), "127.0.0.1", false, how));
  CHECK(how.drop_request.contains("Authorization"));
  CHECK(how.drop_request.contains("Cookie"));
  CHECK(how.drop_request.contains("X-Other"));
  CHECK_FALSE(how.drop_request.contains("X-Plain"));
  CHECK_FALSE(how.drop_request.contains("Host"));
}

TEST_CASE("app forwarding: beside x-api-key, Authorization is the app's own", "[gateway][app]") {
  auto req = request();
  req.set("x-api-key", kKey);
  req.set(http::field::authorization, "Bearer app-jwt");
  proxy::AppForward how;
  REQUIRE_FALSE(plan_app_request(req, alice(), "127.0.0.1", false, how));
  CHECK(how.drop_request.contains("x-api-key"));
  CHECK_FALSE(how.drop_request.contains("Authorization"));
}

TEST_CASE("app forwarding: a key used as a public path's Host is refused", "[gateway][app]") {
  auto req = request();
  req.set(http::field::host, kKey);
  proxy::AppForward how;
  auto violation = plan_app_request(req, std::nullopt, "127.0.0.1", false, how);
  REQUIRE(violation);
  CHECK(violation->status == 400);
}

TEST_CASE("app forwarding: X-Forwarded-* are kept only from a trusted proxy", "[gateway][app]") {
  auto req = request("http://app.example/app/x?q=1");
  req.insert("X-Forwarded-For", "203.0.113.7");
  req.insert("X-Forwarded-For", "198.51.100.2");
  req.set("X-Forwarded-Proto", "https");
  req.set("X-Forwarded-Host", "public.example");
  req.set("X-Real-IP", "203.0.113.7");
  req.set("Forwarded", "for=203.0.113.7");
  SECTION("untrusted: replaced and dropped") {
    proxy::AppForward how;
    REQUIRE_FALSE(plan_app_request(req, std::nullopt, "192.0.2.1", false, how));
    CHECK(has_line(how.request_headers, "X-Forwarded-For: 192.0.2.1"));
    CHECK(has_line(how.request_headers, "X-Forwarded-Proto: http"));
    CHECK(has_line(how.request_headers, "X-Forwarded-Host: app.example"));
    CHECK(how.drop_request.contains("X-Real-IP"));
    CHECK(how.drop_request.contains("Forwarded"));
    CHECK(how.drop_request.contains("X-Forwarded-Port"));
  }
  SECTION("trusted: the chain is appended to, the proxy's scheme and host kept") {
    proxy::AppForward how;
    REQUIRE_FALSE(plan_app_request(req, std::nullopt, "10.0.0.5", true, how));
    CHECK(has_line(how.request_headers, "X-Forwarded-For: 203.0.113.7, 198.51.100.2, 10.0.0.5"));
    CHECK(how.request_headers.find("X-Forwarded-Proto") == std::string::npos);
    CHECK(how.request_headers.find("X-Forwarded-Host") == std::string::npos);
    CHECK_FALSE(how.drop_request.contains("Forwarded"));
  }
  SECTION("the app gets the target in origin form") {
    proxy::AppForward how;
    REQUIRE_FALSE(plan_app_request(req, std::nullopt, "192.0.2.1", false, how));
    CHECK(how.target == "/app/x?q=1");
  }
}

TEST_CASE("app forwarding: underscore spellings of vouched headers never reach the app", "[gateway][app]") {
  auto req = request();
  req.set("X_Tollgate_User", "admin");
  req.set("x_tollgate_key-id", "forged");
  req.set("X_Forwarded_Proto", "https");
  req.set("X_Real_Ip", "10.0.0.1");
  req.set("X_Custom_Thing", "kept");
  proxy::AppForward how;
  REQUIRE_FALSE(plan_app_request(req, alice(), "127.0.0.1", false, how));
  CHECK(how.drop_request.contains("X_Tollgate_User"));
  CHECK(how.drop_request.contains("x_tollgate_key-id"));
  CHECK(how.drop_request.contains("X_Forwarded_Proto"));
  CHECK(how.drop_request.contains("X_Real_Ip"));
  CHECK_FALSE(how.drop_request.contains("X_Custom_Thing"));
}
