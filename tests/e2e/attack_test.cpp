// The attack suite: raw requests an attacker would send through the app
// proxy, in the categories of nginx-tests, HAProxy's VTest and Envoy's
// protocol-violation tests. Each case asserts what the client reads and the
// exact bytes the app (a recording server on loopback) receives; a case that
// keeps the connection open is followed by one more request, which must still
// be answered in step.
#include <catch2/catch.hpp>
#include <memory>
#include <thread>

#include "harness.hpp"
#include "recording_app.hpp"

using namespace tollgate::test;

namespace {

struct Attack {
  std::string name;
  std::string request;           // sent in one write
  std::vector<int> statuses;     // the answers the client reads, in order
  bool closes = false;           // the gateway closes the connection after them
  std::vector<std::string> app;  // each request the app receives, byte for byte
};

// A gateway in front of a recording app, with two users' keys.
struct World {
  TempDir dir;
  RecordingApp app;
  std::string alice, bob;
  std::unique_ptr<GatewayProcess> gateway;

  World() {
    std::string db = dir.file("tollgate.db");
    alice = create_key(db, "alice");
    bob = create_key(db, "bob");
    GatewayProcess::Options o;
    o.db = db;
    o.config_yaml = "app_upstream: http://127.0.0.1:" + std::to_string(app.port()) +
                    "\npublic_paths: [/public/*]\n"
                    "limits: {header_timeout: 3s, body_timeout: 3s}\n"
                    "backends: [{name: echo, type: echo}]\n"
                    "models: [{name: echo, deployments: [{backend: echo}]}]\n";
    gateway = std::make_unique<GatewayProcess>(dir, o);
  }

  std::string app_host() const { return "127.0.0.1:" + std::to_string(app.port()); }

  // The lines the gateway adds to what a client sent with Host `host`.
  static std::string forwarding(const std::string& host) {
    std::string out = "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n";
    if (!host.empty()) out += "X-Forwarded-Host: " + host + "\r\n";
    return out;
  }
  // What the app receives for a request from `key`'s user: the request line,
  // the client's end-to-end `headers`, the gateway's lines, then `tail` (the
  // framing line, if any, the blank line and the body).
  std::string as(const std::string& key, const std::string& user, const std::string& line, const std::string& headers,
                 const std::string& tail, const std::string& host = "h") const {
    return line + "\r\n" + headers + "X-Tollgate-User: " + user + "\r\nX-Tollgate-Key-Id: " + key.substr(0, 11) +
           "\r\n" + forwarding(host) + tail;
  }
  std::string as_alice(const std::string& line, const std::string& headers, const std::string& tail,
                       const std::string& host = "h") const {
    return as(alice, "alice", line, headers, tail, host);
  }
  std::string as_bob(const std::string& line, const std::string& headers, const std::string& tail) const {
    return as(bob, "bob", line, headers, tail);
  }
  static std::string as_public(const std::string& line, const std::string& headers, const std::string& tail,
                               const std::string& host = "h") {
    return line + "\r\n" + headers + forwarding(host) + tail;
  }

  void run(const Attack& a) {
    INFO("attack: " << a.name);
    app.reset();
    HttpClient client(gateway->port(), 5s);
    REQUIRE(client.send_raw(a.request));
    std::vector<std::string> expected = a.app;
    for (int status : a.statuses) {
      auto r = client.read_response();
      REQUIRE(r);
      CHECK(r->status == status);
      if (status == 200 && !r->header("x-app-response").empty()) CHECK(r->body.starts_with("app-response-"));
      if (status >= 400) CHECK(r->body.find("\"error\"") != std::string::npos);
    }
    if (a.closes) {
      CHECK(client.wait_closed(4s));
    } else {
      // Still in step: one more request gets its own answer.
      REQUIRE(client.send_raw("GET /public/follow-up HTTP/1.1\r\nHost: h\r\n\r\n"));
      auto r = client.read_response();
      REQUIRE(r);
      CHECK(r->status == 200);
      CHECK(r->body == "app-response-" + r->header("x-app-response"));
      expected.push_back(as_public("GET /public/follow-up HTTP/1.1", "Host: h\r\n", "\r\n"));
    }
    app.wait_requests(expected.size(), 3s);
    // A smuggled request would arrive with the one that carried it.
    std::this_thread::sleep_for(100ms);
    auto got = app.requests();
    CHECK(got.size() == expected.size());
    for (std::size_t i = 0; i < std::min(got.size(), expected.size()); ++i) CHECK(got[i].bytes == expected[i]);
    std::string all;
    for (const auto& e : expected) all += e;
    CHECK(app.all_bytes() == all);
  }
};

const std::string kHello = "Content-Length: 5\r\n\r\nhello";
const std::string kChunkedHello = "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
const std::string kNoBody = "\r\n";

std::string length(const std::string& body) { return "Content-Length: " + std::to_string(body.size()) + "\r\n"; }

}  // namespace

TEST_CASE("attack: a header named by Connection never unframes a body or forges an identity", "[e2e][attack]") {
  World w;
  const std::string smuggled = "GET /internal/admin-only HTTP/1.1\r\nHost: h\r\nX-Tollgate-User: admin\r\n\r\n";
  const std::string bearer = "Authorization: Bearer " + w.alice + "\r\n";
  std::vector<Attack> attacks = {
      {"public path, Connection: Content-Length",
       "POST /public/upload HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\n" + length(smuggled) + "\r\n" +
           smuggled,
       {200},
       false,
       {w.as_public("POST /public/upload HTTP/1.1", "Host: h\r\n", length(smuggled) + "\r\n" + smuggled)}},
      {"key path, Connection: keep-alive, Content-Length",
       "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + "Connection: keep-alive, Content-Length\r\n" +
           length(smuggled) + "\r\n" + smuggled,
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", length(smuggled) + "\r\n" + smuggled)}},
      {"Connection: Transfer-Encoding",
       "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + "Connection: Transfer-Encoding\r\n" + kChunkedHello,
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"Connection: Host keeps Host",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nConnection: Host\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"Connection: X-Tollgate-User on a public path",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nConnection: X-Tollgate-User\r\nX-Tollgate-User: admin\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"Connection: close ends the client connection, not the framing",
       "POST /public/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + kHello,
       {200},
       true,
       {w.as_public("POST /public/x HTTP/1.1", "Host: h\r\n", kHello)}},
      {"Connection: x-api-key still authenticates, the key still goes",
       "GET /x HTTP/1.1\r\nHost: h\r\nConnection: x-api-key\r\nx-api-key: " + w.alice + "\r\n\r\n",
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"Connection: Authorization",
       "GET /x HTTP/1.1\r\nHost: h\r\nConnection: Authorization\r\n" + bearer + "\r\n",
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"Connection naming every framing header at once",
       "POST /public/x HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, Transfer-Encoding, Host, Keep-Alive\r\n"
       "Keep-Alive: timeout=5\r\n" +
           kChunkedHello,
       {200},
       false,
       {w.as_public("POST /public/x HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"Connection: X-Tollgate-Key-Id on a key path gets the gateway's own",
       "GET /x HTTP/1.1\r\nHost: h\r\n" + bearer + "Connection: X-Tollgate-Key-Id\r\nX-Tollgate-Key-Id: forged\r\n\r\n",
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: Content-Length and Transfer-Encoding combinations", "[e2e][attack]") {
  World w;
  const std::string bearer = "Authorization: Bearer " + w.alice + "\r\n";
  auto post = [&](const std::string& framing) { return "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + framing; };
  auto refused = [&](const std::string& name, const std::string& framing, int status = 400) {
    return Attack{name, post(framing), {status}, true, {}};
  };
  std::vector<Attack> attacks = {
      refused("CL then TE", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
      refused("TE then CL", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
      refused("two different CL lines", "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
      refused("a CL list that disagrees", "Content-Length: 5, 6\r\n\r\nhello!"),
      refused("CL with a sign", "Content-Length: +5\r\n\r\nhello"),
      refused("a negative CL", "Content-Length: -1\r\n\r\nhello"),
      refused("a hexadecimal CL", "Content-Length: 0x5\r\n\r\nhello"),
      refused("a CL with letters", "Content-Length: 5a\r\n\r\nhello"),
      refused("a CL past 2^64", "Content-Length: 99999999999999999999999\r\n\r\nhello"),
      refused("an empty CL", "Content-Length: \r\n\r\nhello"),
      {"a CL list of equal values is forwarded as one",
       post("Content-Length: 5, 5\r\n\r\nhello"),
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kHello)}},
      {"two equal CL lines are forwarded as one",
       post("Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kHello)}},
      {"a CL with surrounding whitespace",
       post("Content-Length:   5  \r\n\r\nhello"),
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kHello)}},
      {"a GET with a body keeps it framed",
       "GET /get HTTP/1.1\r\nHost: h\r\n" + bearer + kHello,
       {200},
       false,
       {w.as_alice("GET /get HTTP/1.1", "Host: h\r\n", kHello)}},
      {"CL: 0",
       post("Content-Length: 0\r\n\r\n"),
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", "Content-Length: 0\r\n\r\n")}},
      {"a POST without framing has no body: what follows is the next request",
       "POST /public/a HTTP/1.1\r\nHost: h\r\n\r\nGET /public/b HTTP/1.1\r\nHost: h\r\n\r\n",
       {200, 200},
       false,
       {w.as_public("POST /public/a HTTP/1.1", "Host: h\r\n", kNoBody),
        w.as_public("GET /public/b HTTP/1.1", "Host: h\r\n", kNoBody)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: transfer codings other than a final chunked are refused, never read as no body", "[e2e][attack]") {
  World w;
  const std::string bearer = "Authorization: Bearer " + w.alice + "\r\n";
  const std::string body = "\r\n5\r\nhello\r\n0\r\n\r\n";
  auto te = [&](const std::string& name, const std::string& lines, int status = 400) {
    return Attack{name, "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + lines + body, {status}, true, {}};
  };
  std::vector<Attack> attacks = {
      te("xchunked", "Transfer-Encoding: xchunked\r\n"),
      te("chunked, identity", "Transfer-Encoding: chunked, identity\r\n"),
      te("gzip alone", "Transfer-Encoding: gzip\r\n"),
      te("gzip, chunked is not implemented", "Transfer-Encoding: gzip, chunked\r\n", 501),
      te("gzip and chunked on two lines", "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
      te("chunked twice in a list", "Transfer-Encoding: chunked, chunked\r\n"),
      te("chunked on two lines", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
      te("identity", "Transfer-Encoding: identity\r\n"),
      te("an empty coding", "Transfer-Encoding: \r\n"),
      te("chunked with a parameter", "Transfer-Encoding: chunked;q=1\r\n"),
      te("a space before the colon", "Transfer-Encoding : chunked\r\n"),
      te("a vertical tab before chunked",
         "Transfer-Encoding: \x0b"
         "chunked\r\n"),
      {"Transfer-Encoding in HTTP/1.0",
       "POST /upload HTTP/1.0\r\nHost: h\r\n" + bearer + "Transfer-Encoding: chunked\r\n" + body,
       {400},
       true,
       {}},
      {"Chunked in capitals is chunked",
       "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + "Transfer-Encoding: Chunked\r\n" + body,
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"chunked after a tab",
       "POST /upload HTTP/1.1\r\nHost: h\r\n" + bearer + "Transfer-Encoding:\tchunked\r\n" + body,
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: malformed chunked bodies on the app route get 400 and a close", "[e2e][attack]") {
  World w;
  const std::string head =
      "POST /upload HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + w.alice + "\r\nTransfer-Encoding: chunked\r\n\r\n";
  auto broken = [&](const std::string& name, const std::string& body) {
    return Attack{name, head + body, {400}, true, {}};
  };
  std::vector<Attack> attacks = {
      broken("a chunk size that is not hex", "zz\r\nhello\r\n0\r\n\r\n"),
      broken("a negative chunk size", "-5\r\nhello\r\n0\r\n\r\n"),
      broken("a chunk size past 64 bits", "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
      broken("a control character in an extension", "5;\x01\r\nhello\r\n0\r\n\r\n"),
      broken("a bare LF after the size", "5\nhello\r\n0\r\n\r\n"),
      broken("no CRLF after the data", "5\r\nhelloXX0\r\n\r\n"),
      broken("more data than the size", "3\r\nhello\r\n0\r\n\r\n"),
      broken("a space before the size", " 5\r\nhello\r\n0\r\n\r\n"),
      broken("a 0x prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
      broken("a trailer line without a colon", "5\r\nhello\r\n0\r\nnot a trailer\r\n\r\n"),
      {"extensions are dropped, the data kept",
       head + "5;name=value\r\nhello\r\n0;last\r\n\r\n",
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"a quoted extension",
       head + "5;a=\"b c\"\r\nhello\r\n0\r\n\r\n",
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"trailers are not forwarded",
       head + "5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
      {"many small chunks arrive as one",
       head + "2\r\nhe\r\n2\r\nll\r\n1\r\no\r\n0\r\n\r\n",
       {200},
       false,
       {w.as_alice("POST /upload HTTP/1.1", "Host: h\r\n", kChunkedHello)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: header syntax the gateway refuses or forwards exactly", "[e2e][attack]") {
  World w;
  auto refused = [](const std::string& name, const std::string& request, int status = 400) {
    return Attack{name, request, {status}, true, {}};
  };
  std::vector<Attack> attacks = {
      refused("a space before a header's colon", "GET /public/x HTTP/1.1\r\nHost : h\r\n\r\n"),
      refused("a line without a colon", "GET /public/x HTTP/1.1\r\nHost: h\r\nGarbage\r\n\r\n"),
      refused("a NUL in a value", std::string("GET /public/x HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n", 44)),
      refused("a CR inside a value", "GET /public/x HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n"),
      refused("a DEL in a value",
              "GET /public/x HTTP/1.1\r\nHost: h\r\nX-A: a\x7f"
              "b\r\n\r\n"),
      refused("bare LF line endings", "GET /public/x HTTP/1.1\nHost: h\nX-A: b\n\n"),
      refused("a name with a separator", "GET /public/x HTTP/1.1\r\nHost: h\r\nX(A): v\r\n\r\n"),
      refused("an empty header name", "GET /public/x HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n"),
      refused("two spaces in the request line", "GET  /public/x HTTP/1.1\r\nHost: h\r\n\r\n"),
      refused("a lower-case protocol name", "GET /public/x http/1.1\r\nHost: h\r\n\r\n"),
      refused("HTTP/2.0 in an HTTP/1 request line", "GET /public/x HTTP/2.0\r\nHost: h\r\n\r\n"),
      refused("HTTP/1.2", "GET /public/x HTTP/1.2\r\nHost: h\r\n\r\n"),
      refused("an HTTP/0.9 request line", "GET /public/x\r\nHost: h\r\n\r\n"),
      refused("headers past max_header",
              "GET /public/x HTTP/1.1\r\nHost: h\r\nX-Big: " + std::string(20000, 'a') + "\r\n\r\n", 431),
      refused("an Expect other than 100-continue", "GET /public/x HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\n\r\n", 417),
      {"an obsolete line fold is joined with a space",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n  b\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\nX-Folded: a b\r\n", kNoBody)}},
      {"a tab and obs-text in a value pass as they are",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nX-A: a\tb\xe2\x82\xac\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\nX-A: a\tb\xe2\x82\xac\r\n", kNoBody)}},
      {"an unknown method is forwarded as sent",
       "PURGE /public/x HTTP/1.1\r\nHost: h\r\n\r\n",
       {200},
       false,
       {w.as_public("PURGE /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"hop-by-hop request headers stay here",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
       "Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nX-End: kept\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\nX-End: kept\r\n", kNoBody)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: Host and request-target rules", "[e2e][attack]") {
  World w;
  const std::string bearer = "Authorization: Bearer " + w.alice + "\r\n";
  auto refused = [](const std::string& name, const std::string& request, int status = 400) {
    return Attack{name, request, {status}, true, {}};
  };
  std::vector<Attack> attacks = {
      refused("HTTP/1.1 without Host", "GET /public/x HTTP/1.1\r\nX-A: b\r\n\r\n"),
      refused("two Host headers", "GET /public/x HTTP/1.1\r\nHost: h\r\nHost: evil\r\n\r\n"),
      refused("a space in Host", "GET /public/x HTTP/1.1\r\nHost: a b\r\n\r\n"),
      refused("a list in Host", "GET /public/x HTTP/1.1\r\nHost: a,b\r\n\r\n"),
      refused("userinfo in Host", "GET /public/x HTTP/1.1\r\nHost: user@h\r\n\r\n"),
      refused("a path in Host", "GET /public/x HTTP/1.1\r\nHost: h/x\r\n\r\n"),
      refused("an absolute target whose authority differs from Host",
              "GET http://other/public/x HTTP/1.1\r\nHost: h\r\n\r\n"),
      refused("an ftp target", "GET ftp://h/public/x HTTP/1.1\r\nHost: h\r\n\r\n"),
      refused("an asterisk target for GET", "GET * HTTP/1.1\r\nHost: h\r\n\r\n"),
      refused("CONNECT", "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
      refused("a fragment in the target", "GET /public/x#frag HTTP/1.1\r\nHost: h\r\n\r\n"),
      refused("a target that is not a path", "GET public/x HTTP/1.1\r\nHost: h\r\n\r\n"),
      {"HTTP/1.0 without Host: the app gets an HTTP/1.1 request with its own Host",
       "GET /public/x HTTP/1.0\r\n\r\n",
       {200},
       true,
       {"GET /public/x HTTP/1.1\r\nHost: " + w.app_host() + "\r\n" + World::forwarding("") + kNoBody}},
      {"an absolute target is forwarded in origin form",
       "GET http://h/public/x?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x?q=1 HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"an absolute target's path decides publicness: dot segments need a key",
       "GET http://h/public/../private HTTP/1.1\r\nHost: h\r\n\r\n",
       {401},
       false,
       {}},
      {"an absolute target to a gateway route is the gateway's",
       "GET http://h/healthz HTTP/1.1\r\nHost: h\r\n\r\n",
       {200},
       false,
       {}},
      {"OPTIONS * with a key",
       "OPTIONS * HTTP/1.1\r\nHost: h\r\n" + bearer + "\r\n",
       {200},
       false,
       {w.as_alice("OPTIONS * HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a Host with a port",
       "GET /public/x HTTP/1.1\r\nHost: h:8443\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h:8443\r\n", kNoBody, "h:8443")}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: pipelined requests are answered in order, each as its own caller", "[e2e][attack]") {
  World w;
  const std::string a_key = "Authorization: Bearer " + w.alice + "\r\n";
  const std::string b_key = "Authorization: Bearer " + w.bob + "\r\n";
  const std::string inner = "GET /public/smuggled HTTP/1.1\r\nHost: h\r\n\r\n";
  std::vector<Attack> attacks = {
      {"two GETs in one write",
       "GET /a HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\nGET /b HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\n",
       {200, 200},
       false,
       {w.as_alice("GET /a HTTP/1.1", "Host: h\r\n", kNoBody), w.as_alice("GET /b HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"alice then bob on one connection",
       "GET /a HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\nGET /b HTTP/1.1\r\nHost: h\r\n" + b_key + "\r\n",
       {200, 200},
       false,
       {w.as_alice("GET /a HTTP/1.1", "Host: h\r\n", kNoBody), w.as_bob("GET /b HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a refused request's small body is read, not forwarded",
       "POST /private HTTP/1.1\r\nHost: h\r\n" + kHello + "GET /public/x HTTP/1.1\r\nHost: h\r\n\r\n",
       {401, 200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a refused request whose body looks like a request",
       "POST /private HTTP/1.1\r\nHost: h\r\n" + length(inner) + "\r\n" + inner,
       {401},
       false,
       {}},
      {"chunked, then a GET",
       "POST /a HTTP/1.1\r\nHost: h\r\n" + a_key + kChunkedHello + "GET /b HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\n",
       {200, 200},
       false,
       {w.as_alice("POST /a HTTP/1.1", "Host: h\r\n", kChunkedHello),
        w.as_alice("GET /b HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"nothing after Connection: close is read",
       "GET /public/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /public/b HTTP/1.1\r\nHost: h\r\n\r\n",
       {200},
       true,
       {w.as_public("GET /public/a HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"nothing after a framing error is read",
       "POST /public/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\nGET /public/b HTTP/1.1\r\nHost: "
       "h\r\n\r\n",
       {400},
       true,
       {}},
      {"a gateway route between two app requests",
       "GET /public/a HTTP/1.1\r\nHost: h\r\n\r\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\nGET /public/b HTTP/1.1\r\n"
       "Host: h\r\n\r\n",
       {200, 200, 200},
       false,
       {w.as_public("GET /public/a HTTP/1.1", "Host: h\r\n", kNoBody),
        w.as_public("GET /public/b HTTP/1.1", "Host: h\r\n", kNoBody)}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: a Tollgate key never reaches the app, wherever it is put", "[e2e][attack]") {
  World w;
  const std::string a_key = "Authorization: Bearer " + w.alice + "\r\n";
  const std::string fake = "tg-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
  const std::string admin_shaped = "tg-admin-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
  auto get = [](const std::string& headers) { return "GET /x HTTP/1.1\r\nHost: h\r\n" + headers + "\r\n"; };
  auto x_api = "x-api-key: " + w.alice + "\r\n";
  std::vector<Attack> attacks = {
      {"a second Authorization", get(a_key + "Authorization: Bearer " + w.bob + "\r\n"), {400}, true, {}},
      {"a second x-api-key", get(x_api + "x-api-key: " + w.bob + "\r\n"), {400}, true, {}},
      {"Authorization: Token beside x-api-key",
       get(x_api + "Authorization: Token " + w.alice + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a bare key in Authorization beside x-api-key",
       get(x_api + "Authorization: " + w.bob + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a key in a cookie",
       get(a_key + "Cookie: theme=dark; tg=" + w.bob + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"the key in another header",
       get(a_key + "X-Debug: sent with " + w.alice + " by mistake\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"x-api-key leaves the app its own Authorization",
       get(x_api + "Authorization: Bearer app-jwt\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\nAuthorization: Bearer app-jwt\r\n", kNoBody)}},
      {"a key sent to a public path",
       "GET /public/x HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"an app token on a public path passes",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer app-token\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\nAuthorization: Bearer app-token\r\n", kNoBody)}},
      {"a forged X-Tollgate-User is replaced",
       get(a_key + "X-Tollgate-User: admin\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a forged identity on a public path is dropped",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nX-Tollgate-Key-Id: tg-forged\r\nx-tollgate-user: admin\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"underscore spellings of the identity and forwarding headers are dropped",
       get(a_key + "X_Tollgate_User: admin\r\nx_tollgate-key_id: tg-forged\r\nX-Tollgate_Role: root\r\n"
                   "X_Forwarded_For: 10.0.0.1\r\nX_Real_IP: 10.0.0.2\r\nX_App_Header: kept\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\nX_App_Header: kept\r\n", kNoBody)}},
      {"an underscore identity on a public path is dropped",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nX_TOLLGATE_USER: admin\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a key-shaped string that is no key",
       "GET /public/x HTTP/1.1\r\nHost: h\r\nX-Other: " + fake + "\r\n\r\n",
       {200},
       false,
       {w.as_public("GET /public/x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"an admin-shaped key",
       get(a_key + "X-Admin: " + admin_shaped + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"lower-case header and scheme",
       get("authorization: bearer " + w.alice + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"a key in Host", "GET /public/x HTTP/1.1\r\nHost: " + w.alice + "\r\n\r\n", {400}, false, {}},
      {"a key in X-Forwarded-For from an untrusted peer",
       get(a_key + "X-Forwarded-For: " + w.alice + "\r\n"),
       {200},
       false,
       {w.as_alice("GET /x HTTP/1.1", "Host: h\r\n", kNoBody)}},
      {"no key at all", get(""), {401}, false, {}},
      {"an unknown key-shaped key", get("Authorization: Bearer " + fake + "\r\n"), {401}, false, {}},
  };
  for (const auto& a : attacks) w.run(a);
}

TEST_CASE("attack: a 100-continue request refused before its body gets no 100 Continue", "[e2e][attack]") {
  World w;
  HttpClient client(w.gateway->port(), 5s);
  REQUIRE(client.send_raw("POST /private HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"));
  auto r = client.read_some(2s);
  CHECK(r.starts_with("HTTP/1.1 401 "));
  CHECK(r.find("100 Continue") == std::string::npos);
  CHECK(client.wait_closed(3s));
  CHECK(w.app.requests().empty());
}

TEST_CASE("attack: an app that answers more than it was asked never answers another user", "[e2e][attack]") {
  World w;
  const std::string a_key = "Authorization: Bearer " + w.alice + "\r\n";
  // The app sends a second, unrequested response after the first.
  {
    HttpClient alice(w.gateway->port(), 5s);
    auto r = alice.request("GET", "/extra/x", "", {{"Authorization", "Bearer " + w.alice}});
    CHECK(r.status == 200);
    CHECK(r.body == "app-response-" + r.header("x-app-response"));
  }
  std::this_thread::sleep_for(200ms);  // the extra bytes reach the pooled connection
  for (int i = 0; i < 12; ++i) {
    HttpClient bob(w.gateway->port(), 5s);
    auto r = bob.request("GET", "/b/" + std::to_string(i), "", {{"Authorization", "Bearer " + w.bob}});
    CHECK(r.status == 200);
    CHECK(r.header("x-app-response") != "smuggled");
    CHECK(r.body == "app-response-" + r.header("x-app-response"));
  }
  // Connection naming the framing headers in a response: the client still gets them.
  HttpClient client(w.gateway->port(), 5s);
  REQUIRE(client.send_raw("GET /conn-cl/x HTTP/1.1\r\nHost: h\r\n" + a_key + "\r\n"));
  auto framed = client.read_response();
  REQUIRE(framed);
  CHECK(framed->header("content-length") == std::to_string(framed->body.size()));
  CHECK(framed->body == "app-response-" + framed->header("x-app-response"));
  auto next = client.request("GET", "/chunked/x", "", {{"Authorization", "Bearer " + w.alice}});
  CHECK(next.status == 200);
  CHECK(next.body == "app-response-" + next.header("x-app-response"));
  // An app answer with Content-Length and Transfer-Encoding is never relayed: 502, said as what it is.
  auto unframed = client.request("GET", "/cl-te/x", "", {{"Authorization", "Bearer " + w.alice}});
  CHECK(unframed.status == 502);
  CHECK(unframed.json().at("error").at("code") == "app_bad_response");
  CHECK(unframed.json().at("error").at("message").as_string().find("malformed") != std::string::npos);
}
