// The app reverse proxy: every path the gateway does not own goes to
// app_upstream, here a small Python app (fake_app.py) that echoes what it got.
#include <catch2/catch.hpp>


#include <algorithm>
#include <cstdio>
#include <set>
#include <thread>

#include "harness.hpp"
#include "upstream.hpp"
#include "metering/api_key.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

std::string app_config(std::uint16_t app_port, const std::string& extra = "") {
  return "app_upstream: http://127.0.0.1:" + std::to_string(app_port) +
         "\npublic_paths: [/actuator/health, /public/*]\n"
         "metering: {flush_interval: 100ms}\n"
         "backends: [{name: echo, type: echo}]\n"
         "models: [{name: echo, deployments: [{backend: echo}]}]\n" +
         extra;
}

// What the fake app received.
struct Echo {
  json::object body;

  explicit Echo(const HttpResponse& r) : body(r.json().as_object()) {}
  // Every value of a header, by case-insensitive name.
  std::vector<std::string> all(std::string_view name) const {
    std::vector<std::string> values;
    for (const auto& h : body.at("headers").as_array()) {
      const auto& pair = h.as_array();
      std::string n(pair[0].as_string());
      if (n.size() == name.size() && std::equal(n.begin(), n.end(), name.begin(), [](char a, char b) {
            return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b));
          })) {
        values.emplace_back(pair[1].as_string());
      }
    }
    return values;
  }
  std::string one(std::string_view name) const {
    auto v = all(name);
    return v.size() == 1 ? v[0] : "<" + std::to_string(v.size()) + " values>";
  }
  bool has(std::string_view name) const { return !all(name).empty(); }
  std::string raw() const { return json::serialize(body); }
};

// Usage rows are written behind; polls (bounded) until `where` has `expected` rows.
std::int64_t wait_rows(const std::string& db, const std::string& where, std::int64_t expected) {
  std::int64_t n = -1;
  for (int i = 0; i < 200; ++i) {
    n = count_usage_rows(db, where);
    if (n >= expected) break;
    std::this_thread::sleep_for(50ms);
  }
  return n;
}

GatewayProcess::Options options(std::string config_yaml) {
  GatewayProcess::Options o;
  o.config_yaml = std::move(config_yaml);
  return o;
}

std::string sha256(const std::string& data) { return tollgate::metering::sha256_hex(data); }

std::string pattern_bytes(std::size_t size) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 2654435761u) >> 13);
  return s;
}

}  // namespace

TEST_CASE("app paths need a key, and the app sees who called, never the key", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port())));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto anonymous = client.get("/echo/a");
  CHECK(anonymous.status == 401);
  CHECK(anonymous.json().at("error").at("code") == "missing_api_key");
  CHECK(client.get("/echo/a", "tg-notakeyatall00000000000000000000").status == 401);

  auto r = client.request("POST", "/echo/a?x=1&y=2", "hello app",
                          {{"Authorization", "Bearer " + key},
                           {"X-Tollgate-User", "mallory"},
                           {"x-tollgate-key-id", "tg-forged"},
                           {"Connection", "X-Client-Hop"},
                           {"X-Client-Hop", "1"},
                           {"Keep-Alive", "timeout=5"},
                           {"Proxy-Authorization", "Basic Zm9vOmJhcg=="},
                           {"TE", "trailers"},
                           {"Upgrade", "websocket"},
                           {"X-Client-End-To-End", "kept"}});
  REQUIRE(r.status == 200);
  Echo seen(r);
  CHECK(seen.body.at("method") == "POST");
  CHECK(seen.body.at("path") == "/echo/a");
  CHECK(seen.body.at("query") == "x=1&y=2");
  CHECK(seen.body.at("body_length") == 9);
  CHECK(seen.one("X-Tollgate-User") == "alice");
  CHECK(seen.one("X-Tollgate-Key-Id") == key.substr(0, 11));
  CHECK_FALSE(seen.has("Authorization"));
  CHECK(seen.raw().find(key) == std::string::npos);
  for (auto hop : {"Connection", "X-Client-Hop", "Keep-Alive", "Proxy-Authorization", "TE", "Upgrade"}) {
    INFO(hop);
    CHECK_FALSE(seen.has(hop));
  }
  CHECK(seen.one("X-Client-End-To-End") == "kept");
  // And the way back: the app's hop-by-hop headers stop here too.
  CHECK(r.header("x-app-end-to-end") == "kept");
  CHECK(r.header("x-app-hop").empty());
  CHECK(r.header("keep-alive").empty());
  CHECK(r.header("proxy-authenticate").empty());
  CHECK(r.header("connection").empty());

  // A key in x-api-key leaves the client's own Authorization for the app.
  auto own_auth = client.request("GET", "/echo/b", "", {{"x-api-key", key}, {"Authorization", "Basic YXBwOnB3"}});
  REQUIRE(own_auth.status == 200);
  Echo seen_own(own_auth);
  CHECK(seen_own.one("Authorization") == "Basic YXBwOnB3");
  CHECK_FALSE(seen_own.has("x-api-key"));

  // Public paths skip auth; identity headers a client made up still go, and so does a Tollgate key.
  auto health = client.request("GET", "/actuator/health", "", {{"X-Tollgate-User", "mallory"}});
  REQUIRE(health.status == 200);
  CHECK_FALSE(Echo(health).has("X-Tollgate-User"));
  auto public_with_key = client.get("/public/docs/index.html", key);
  REQUIRE(public_with_key.status == 200);
  CHECK_FALSE(Echo(public_with_key).has("Authorization"));
  CHECK_FALSE(Echo(public_with_key).has("X-Tollgate-User"));
  // Dot segments never match a public prefix: the app could resolve them elsewhere.
  CHECK(client.get("/public/../secret").status == 401);
  CHECK(client.get("/public/..;/secret").status == 401);
  CHECK(client.get("/actuator/health/").status == 401);

  // The gateway's own routes are not proxied.
  CHECK(client.get("/healthz").status == 200);
  auto models = client.get("/v1/models", key);
  CHECK(models.status == 200);
  CHECK(models.json().at("object") == "list");

  // Keep-alive both ways: one client connection, one reused app connection.
  std::set<std::int64_t> app_side_ports;
  for (int i = 0; i < 4; ++i) {
    auto again = client.get("/echo/keepalive?i=" + std::to_string(i), key);
    REQUIRE(again.status == 200);
    app_side_ports.insert(Echo(again).body.at("peer_port").as_int64());
  }
  CHECK(app_side_ports.size() == 1);

  auto metrics = client.get("/metrics");
  CHECK(metrics.body.find(R"(tollgate_http_requests_total{route="app",status="200"})") != std::string::npos);
  CHECK(metrics.body.find(R"(tollgate_http_requests_total{route="app",status="401"})") != std::string::npos);
}

TEST_CASE("X-Forwarded-* are replaced from an untrusted peer, appended from a trusted one", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  Headers forwarded{{"X-Forwarded-For", "203.0.113.7"},
                    {"X-Forwarded-Proto", "https"},
                    {"X-Forwarded-Host", "example.com"}};
  SECTION("untrusted") {
    TempDir dir;
    GatewayProcess gw(dir, options(app_config(app.port(), "trusted_proxies: [10.9.9.9]\n")));
    auto key = create_key(gw.db(), "alice");
    wait_for_key(gw.port(), key);
    HttpClient client(gw.port());
    auto headers = forwarded;
    headers.emplace_back("Authorization", "Bearer " + key);
    auto r = client.request("GET", "/echo", "", headers);
    REQUIRE(r.status == 200);
    Echo seen(r);
    CHECK(seen.one("X-Forwarded-For") == "127.0.0.1");
    CHECK(seen.one("X-Forwarded-Proto") == "http");
    CHECK(seen.one("X-Forwarded-Host") == "127.0.0.1");
  }
  SECTION("trusted") {
    TempDir dir;
    GatewayProcess gw(dir, options(app_config(app.port(), "trusted_proxies: [127.0.0.1]\n")));
    auto key = create_key(gw.db(), "alice");
    wait_for_key(gw.port(), key);
    HttpClient client(gw.port());
    auto headers = forwarded;
    headers.emplace_back("Authorization", "Bearer " + key);
    headers.emplace_back("X-Forwarded-For", "198.51.100.2");  // a second line continues the list
    auto r = client.request("GET", "/echo", "", headers);
    REQUIRE(r.status == 200);
    Echo seen(r);
    CHECK(seen.one("X-Forwarded-For") == "203.0.113.7, 198.51.100.2, 127.0.0.1");
    CHECK(seen.one("X-Forwarded-Proto") == "https");
    CHECK(seen.one("X-Forwarded-Host") == "example.com");
  }
}

TEST_CASE("bodies larger than max_body stream through both ways", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port(), "limits: {max_body: 1MiB}\n")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);
  const std::size_t size = 20 * 1024 * 1024;
  auto upload = pattern_bytes(size);

  // Content-Length upload.
  auto r = client.request("PUT", "/files/big", upload, {{"Authorization", "Bearer " + key}});
  REQUIRE(r.status == 200);
  CHECK(Echo(r).body.at("body_length") == static_cast<std::int64_t>(size));
  CHECK(std::string(Echo(r).body.at("body_sha256").as_string()) == sha256(upload));

  // Chunked upload, then another request on the same connection.
  std::string head = "POST /files/chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                     "\r\nTransfer-Encoding: chunked\r\n\r\n";
  REQUIRE(client.send_raw(head));
  std::size_t chunked_size = 3 * 1024 * 1024 + 17;
  for (std::size_t at = 0; at < chunked_size; at += 700'001) {
    auto piece = upload.substr(at, std::min<std::size_t>(700'001, chunked_size - at));
    char size_line[32];
    std::snprintf(size_line, sizeof size_line, "%zx\r\n", piece.size());
    REQUIRE(client.send_raw(size_line + piece + "\r\n"));
  }
  REQUIRE(client.send_raw("0\r\n\r\n"));
  auto chunked = client.read_response();
  REQUIRE(chunked);
  REQUIRE(chunked->status == 200);
  Echo chunked_seen(*chunked);
  CHECK(chunked_seen.body.at("body_length") == static_cast<std::int64_t>(chunked_size));
  CHECK(std::string(chunked_seen.body.at("body_sha256").as_string()) == sha256(upload.substr(0, chunked_size)));
  CHECK(chunked_seen.one("Transfer-Encoding") == "chunked");

  // Downloads in each framing the app may use; an HTTP/1.1 client always gets a framed body.
  for (std::string framing : {"chunked", "length", "close"}) {
    INFO(framing);
    auto d = client.get("/download?size=" + std::to_string(size) + "&framing=" + framing, key);
    REQUIRE(d.status == 200);
    CHECK(d.body.size() == size);
    CHECK(sha256(d.body) == d.header("x-body-sha256"));
    CHECK((framing == "length" ? d.header("content-length") == std::to_string(size)
                               : d.header("transfer-encoding") == "chunked"));
  }

  // max_body still guards the gateway's own JSON routes.
  // The answer comes before the body is read, and the connection closes.
  HttpClient own(gw.port());
  REQUIRE(own.send_raw("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                       "\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n{"));
  auto too_large = own.read_response();
  REQUIRE(too_large);
  CHECK(too_large->status == 413);
}

TEST_CASE("app down answers 502, app too slow 504, both metered", "[e2e][app_proxy]") {
  SECTION("down") {
    TempDir dir;
    GatewayProcess gw(dir, options(app_config(closed_port())));
    auto key = create_key(gw.db(), "alice");
    wait_for_key(gw.port(), key);
    HttpClient client(gw.port());
    auto r = client.get("/echo/down", key);
    CHECK(r.status == 502);
    CHECK(r.json().at("error").at("code") == "app_unreachable");
    // The request had no body: the client connection is still good.
    CHECK(client.get("/healthz").status == 200);
    CHECK(wait_rows(gw.db(), "route = '/echo/down' AND status = 502 AND user_id IS NOT NULL", 1) == 1);
  }
  SECTION("slow") {
    FakeServer app("fake_app.py");
    TempDir dir;
    GatewayProcess gw(dir, options(app_config(app.port(), "app_timeouts: {first_byte: 300ms}\n")));
    auto key = create_key(gw.db(), "alice");
    wait_for_key(gw.port(), key);
    HttpClient client(gw.port());
    auto r = client.get("/slow?delay=5", key);
    CHECK(r.status == 504);
    CHECK(r.json().at("error").at("code") == "app_timeout");
    CHECK(wait_rows(gw.db(), "route = '/slow' AND status = 504 AND user_id IS NOT NULL", 1) == 1);
    // A fast request after it still works.
    CHECK(client.get("/slow?delay=0", key).status == 200);
  }
}

TEST_CASE("app calls are metered per user and count against the request quota", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port())));
  auto alice = create_key(gw.db(), "alice", {"--rpm", "3"});
  auto bob = create_key(gw.db(), "bob");
  // A snapshot that has bob's key has alice's, made before it: her quota stays untouched.
  wait_for_key(gw.port(), bob);
  HttpClient client(gw.port());
  auto minute = [] { return std::chrono::duration_cast<std::chrono::minutes>(
                         std::chrono::system_clock::now().time_since_epoch()).count(); };
  auto first_minute = minute();
  int admitted = 0;
  HttpResponse last;
  for (int i = 0; i < 10; ++i) {
    last = client.get("/echo/q", alice);
    if (last.status != 200) break;
    ++admitted;
  }
  // Windows are fixed UTC minutes: only a run inside one minute admits exactly the limit.
  if (minute() == first_minute) CHECK(admitted == 3);
  CHECK(admitted >= 3);
  CHECK(last.status == 429);
  CHECK(!last.header("retry-after").empty());
  CHECK(last.header("x-ratelimit-limit-requests") == "3");
  for (int i = 0; i < 2; ++i) CHECK(client.get("/echo/q", bob).status == 200);
  CHECK(client.get("/actuator/health").status == 200);

  const std::string alice_rows =
      "route = '/echo/q' AND user_id = (SELECT id FROM users WHERE name = 'alice')";
  const std::string bob_rows = "route = '/echo/q' AND user_id = (SELECT id FROM users WHERE name = 'bob')";
  CHECK(wait_rows(gw.db(), alice_rows + " AND status = 200 AND backend = 'app'", admitted) == admitted);
  CHECK(wait_rows(gw.db(), alice_rows + " AND status = 429", 1) == 1);
  CHECK(wait_rows(gw.db(), bob_rows + " AND status = 200", 2) == 2);
  // A public path has no caller: no usage row.
  CHECK(count_usage_rows(gw.db(), "route = '/actuator/health'") == 0);
}

TEST_CASE("a client that stalls mid-upload or stops reading a download is cut off and metered 499",
          "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port(), "limits: {body_timeout: 400ms, idle_timeout: 400ms}\n")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  SECTION("upload") {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw("PUT /files/stalled HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                            "\r\nContent-Length: 1000000\r\n\r\n" + std::string(1000, 'u')));
    CHECK(client.wait_closed(10s));
    CHECK(wait_rows(gw.db(), "route = '/files/stalled' AND status = 499 AND user_id IS NOT NULL", 1) == 1);
  }
  SECTION("download") {
    HttpClient client(gw.port());
    // Far more than the socket buffers hold: the relay must wait on the client.
    REQUIRE(client.send_raw("GET /download?size=67108864&framing=length HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            "Authorization: Bearer " +
                            key + "\r\n\r\n"));
    CHECK(wait_rows(gw.db(), "route = '/download' AND status = 499 AND user_id IS NOT NULL", 1) == 1);
    CHECK(client.wait_closed(10s));
  }
  // The gateway serves on.
  HttpClient after(gw.port());
  CHECK(after.get("/echo/after", key).status == 200);
}

TEST_CASE("an app answer slower than header_timeout and idle_timeout still arrives", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port(), "limits: {header_timeout: 300ms, idle_timeout: 400ms}\n")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  auto r = client.get("/slow?delay=1", key);
  CHECK(r.status == 200);
  CHECK(client.get("/slow?delay=0", key).status == 200);
}

TEST_CASE("a client that hangs up while the app thinks is metered 499 at once and never 504", "[e2e][app_proxy]") {
  FakeServer app("fake_app.py");
  TempDir dir;
  GatewayProcess gw(dir, options(app_config(app.port(), "app_timeouts: {first_byte: 20s}\n")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  {
    HttpClient client(gw.port());
    REQUIRE(
        client.send_raw("GET /slow?delay=4 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key + "\r\n\r\n"));
    std::this_thread::sleep_for(300ms);
  }  // the client goes
  // The row appears long before the app would have answered (4 s) or timed out (20 s).
  auto gone = std::chrono::steady_clock::now();
  CHECK(wait_rows(gw.db(), "route = '/slow' AND status = 499 AND user_id IS NOT NULL", 1) == 1);
  CHECK(std::chrono::steady_clock::now() - gone < 3s);
  CHECK(count_usage_rows(gw.db(), "status = 504") == 0);
  // A client that pipelines its next request while waiting is not taken for gone.
  HttpClient pipelined(gw.port());
  REQUIRE(pipelined.send_raw("GET /slow?delay=0.5 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                             "\r\n\r\nGET /echo/next HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                             "\r\n\r\n"));
  auto first = pipelined.read_response();
  REQUIRE(first);
  CHECK(first->status == 200);
  auto second = pipelined.read_response();
  REQUIRE(second);
  CHECK(second->status == 200);
  CHECK(second->json().at("path") == "/echo/next");
}
