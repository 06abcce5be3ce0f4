// Hostile and broken input through the real binary: every case gets the right
// OpenAI-style error (or, for protocol garbage, a closed connection), and the
// server keeps serving everybody else afterwards.
#include <catch2/catch.hpp>
#include <cstdio>
#include <memory>
#include <optional>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

using Clock = std::chrono::steady_clock;

// Options with a config file (designated initialisers would leave fields unnamed).
GatewayProcess::Options with_config(std::string yaml) {
  GatewayProcess::Options options;
  options.config_yaml = std::move(yaml);
  return options;
}

std::string config_with_limits(const std::string& limits) {
  return "limits: {" + limits + "}\n"
         "backends:\n"
         "  - {name: echo, type: echo}\n"
         "models:\n"
         "  - name: echo\n"
         "    deployments: [{backend: echo}]\n";
}

// The response is an OpenAI-style error with this status (and code, when given).
void check_error(const HttpResponse& r, int status, const std::string& code = "") {
  INFO("body: " << r.body);
  CHECK(r.status == status);
  CHECK(r.header("content-type") == "application/json");
  json::value v;
  REQUIRE_NOTHROW(v = r.json());
  REQUIRE(v.is_object());
  const auto* error = v.as_object().if_contains("error");
  REQUIRE(error);
  REQUIRE(error->is_object());
  CHECK(error->as_object().at("message").is_string());
  CHECK(!error->as_object().at("message").as_string().empty());
  CHECK(error->as_object().at("type").is_string());
  if (!code.empty()) CHECK(error->as_object().at("code") == code.c_str());
}

// A fresh client still gets 200 from /healthz and a real completion: the
// server neither crashed nor stalled.
void check_still_serving(std::uint16_t port, const std::string& key) {
  HttpClient client(port);
  CHECK(client.get("/healthz").status == 200);
  auto r = client.post("/v1/chat/completions", key, chat_body("echo", "still alive"));
  REQUIRE(r.status == 200);
  CHECK(r.json().at("choices").at(0).at("message").at("content") == "still alive");
}

// The server answered `status` and closed, or closed without answering.
void check_status_or_closed(HttpClient& client, int status) {
  auto r = client.read_response();
  if (r) {
    check_error(*r, status);
    CHECK(r->header("connection") == "close");
  }
  CHECK(client.wait_closed(10s));
}

std::string post_head(const std::string& key, std::size_t content_length, const std::string& extra = "") {
  return "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(content_length) + "\r\n" + extra +
         "\r\n";
}

}  // namespace

TEST_CASE("invalid completion bodies get 400/404 errors and the connection stays usable", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);

  struct Case {
    const char* what;
    std::string body;
    int status;
    std::string code;
    std::string param;  // empty: not checked
  };
  const std::vector<Case> cases = {
      {"malformed JSON", R"({"model":"echo","messages":[)", 400, "invalid_json", ""},
      {"trailing garbage", R"({"model":"echo"} xyz)", 400, "invalid_json", ""},
      {"empty body", "", 400, "invalid_json", ""},
      {"JSON array, not an object", R"([{"model":"echo"}])", 400, "invalid_json", ""},
      {"JSON string, not an object", R"("hello")", 400, "invalid_json", ""},
      {"model as a number", R"({"model":42,"messages":[{"role":"user","content":"hi"}]})", 400, "invalid_type",
       "model"},
      {"messages as a string", R"({"model":"echo","messages":"hi"})", 400, "invalid_type", "messages"},
      {"max_tokens as a string", chat_body("echo", "hi", R"("max_tokens":"10")"), 400, "invalid_type",
       "max_tokens"},
      {"temperature 5", chat_body("echo", "hi", R"("temperature":5)"), 400, "", "temperature"},
      {"missing model", R"({"messages":[{"role":"user","content":"hi"}]})", 400, "missing_required_parameter",
       "model"},
      {"empty model", chat_body("", "hi"), 400, "", "model"},
      {"missing messages", R"({"model":"echo"})", 400, "missing_required_parameter", "messages"},
      {"empty messages", R"({"model":"echo","messages":[]})", 400, "", "messages"},
      {"message without content", R"({"model":"echo","messages":[{"role":"user"}]})", 400,
       "missing_required_parameter", ""},
      {"invalid UTF-8 in a string", "{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"a\xff\xfe b\"}]}",
       400, "", ""},
      {"truncated UTF-8 sequence", "{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"\xe2\x82\"}]}",
       400, "", ""},
      {"unknown model", chat_body("no-such-model", "hi"), 404, "model_not_found", ""},
  };
  for (const auto& c : cases) {
    INFO("case: " << c.what);
    HttpClient client(gw.port());
    auto r = client.post("/v1/chat/completions", key, c.body);
    check_error(r, c.status, c.code);
    if (!c.param.empty()) CHECK(r.json().at("error").at("param") == c.param.c_str());
    // The body was read in full, so the same connection serves the next request.
    CHECK(client.get("/healthz").status == 200);
    check_still_serving(gw.port(), key);
  }
}

TEST_CASE("a body over max_body gets 413", "[e2e][bad_input]") {
  TempDir dir;

  SECTION("5 MiB against the default 4 MiB limit") {
    GatewayProcess gw(dir);
    auto key = create_key(gw.db(), "mallory");
    wait_for_key(gw.port(), key);
    std::size_t size = 5 * 1024 * 1024;
    std::string body = chat_body("echo", std::string(size, 'a'));
    HttpClient client(gw.port());
    // The limit is checked against Content-Length before any of the body is
    // read; the first 64 KiB go out with the headers, like a real client's.
    REQUIRE(client.send_raw(post_head(key, body.size()) + body.substr(0, 64 * 1024)));
    auto r = client.read_response();
    REQUIRE(r);
    check_error(*r, 413, "request_too_large");
    CHECK(client.wait_closed(10s));
    check_still_serving(gw.port(), key);
  }

  SECTION("max_body: 1KiB refuses a 2 KiB body, with or without Content-Length") {
    GatewayProcess gw(dir, with_config(config_with_limits("max_body: 1KiB")));
    auto key = create_key(gw.db(), "mallory");
    wait_for_key(gw.port(), key);
    std::string body = chat_body("echo", std::string(2048, 'a'));
    {
      HttpClient client(gw.port());
      REQUIRE(client.send_raw(post_head(key, body.size()) + body));
      auto r = client.read_response();
      REQUIRE(r);
      check_error(*r, 413, "request_too_large");
      CHECK(client.wait_closed(10s));
    }
    {
      // Chunked: the limit can only trip while the body is read.
      HttpClient client(gw.port());
      std::string head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                         "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
      std::string chunks;
      for (std::size_t pos = 0; pos < body.size(); pos += 512) {
        auto piece = body.substr(pos, 512);
        char size_hex[16];
        std::snprintf(size_hex, sizeof size_hex, "%zx", piece.size());
        chunks += std::string(size_hex) + "\r\n" + piece + "\r\n";
      }
      chunks += "0\r\n\r\n";
      REQUIRE(client.send_raw(head + chunks));
      auto r = client.read_response();
      REQUIRE(r);
      check_error(*r, 413, "request_too_large");
      CHECK(client.wait_closed(10s));
    }
    {
      // Under the limit still works.
      HttpClient client(gw.port());
      CHECK(client.post("/v1/chat/completions", key, chat_body("echo", "small enough")).status == 200);
    }
    check_still_serving(gw.port(), key);
    // Both 413s are the key's calls: metered (one usage row each).
    auto deadline = Clock::now() + 10s;
    while (count_usage_rows(gw.db(), "status = 413") < 2 && Clock::now() < deadline) std::this_thread::sleep_for(50ms);
    CHECK(count_usage_rows(gw.db(), "status = 413") == 2);
  }

  SECTION("oversized bodies count against the key's request limit") {
    GatewayProcess gw(dir, with_config(config_with_limits("max_body: 1KiB")));
    auto key = create_key(gw.db(), "mallory", {"--rpm", "4"});
    wait_for_key(gw.port(), key);  // the first of the four
    std::string body = chat_body("echo", std::string(2048, 'a'));
    for (int i = 0; i < 3; ++i) {
      HttpClient client(gw.port());
      REQUIRE(client.send_raw(post_head(key, body.size()) + body));
      auto r = client.read_response();
      REQUIRE(r);
      check_error(*r, 413, "request_too_large");
      CHECK(r->header("x-ratelimit-remaining-requests") == std::to_string(2 - i));
    }
    HttpClient client(gw.port());
    auto r = client.post("/v1/chat/completions", key, chat_body("echo", "small"));
    check_error(r, 429);
    // A stranger's oversized body is refused as a stranger's: 401.
    HttpClient stranger(gw.port());
    REQUIRE(stranger.send_raw(post_head("tg-nobody-AAAAAAAAAAAAAAAAAAAAAAAA", body.size()) + body));
    auto s = stranger.read_response();
    REQUIRE(s);
    CHECK(s->status == 401);
  }
}

TEST_CASE("header floods get 431 or a closed connection", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);

  SECTION("one 64 KiB header") {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + std::string(64 * 1024, 'x') +
                            "\r\n\r\n"));
    check_status_or_closed(client, 431);
  }
  SECTION("2000 small headers") {
    std::string req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    for (int i = 0; i < 2000; ++i) req += "X-H" + std::to_string(i) + ": v\r\n";
    req += "\r\n";
    HttpClient client(gw.port());
    REQUIRE(client.send_raw(req));
    check_status_or_closed(client, 431);
  }
  check_still_serving(gw.port(), key);
}

TEST_CASE("a slow-drip client is cut off at header_timeout while others are served", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(config_with_limits("header_timeout: 1s")));
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);

  // At one byte per 200 ms this request would take over a minute to send.
  std::string req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + std::string(300, 'p') + "\r\n\r\n";
  HttpClient drip(gw.port());
  auto started = Clock::now();
  bool closed = false;
  int served_meanwhile = 0;
  for (std::size_t i = 0; i < req.size() && Clock::now() - started < 20s; ++i) {
    if (!drip.send_raw(std::string_view(req).substr(i, 1))) {
      closed = true;
      break;
    }
    // The wait for the close is the 200 ms between bytes.
    if (drip.wait_closed(200ms)) {
      closed = true;
      break;
    }
    HttpClient other(gw.port());
    if (other.get("/healthz").status == 200) ++served_meanwhile;
  }
  CHECK(closed);
  CHECK(served_meanwhile >= 1);
  check_still_serving(gw.port(), key);
}

TEST_CASE("headers without the promised body are closed at body_timeout", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(config_with_limits("body_timeout: 1s")));
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);

  HttpClient client(gw.port());
  REQUIRE(client.send_raw(post_head(key, 1000) + R"({"model":"echo",)"));
  CHECK(client.wait_closed(15s));
  // The abandoned request is still metered, as a timeout.
  auto deadline = Clock::now() + 15s;
  while (count_usage_rows(gw.db(), "status = 408") == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  CHECK(count_usage_rows(gw.db(), "status = 408") == 1);
  check_still_serving(gw.port(), key);
}

TEST_CASE("protocol garbage gets 400 and a close", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);

  SECTION("garbage alone") {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw("GARBAGE\r\n\r\n"));
    check_status_or_closed(client, 400);
  }
  SECTION("garbage pipelined after a valid request") {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGARBAGE\r\n\r\n"));
    auto first = client.read_response();
    REQUIRE(first);
    CHECK(first->status == 200);
    check_status_or_closed(client, 400);
  }
  SECTION("binary noise") {
    std::string noise;
    for (int i = 0; i < 4096; ++i) noise += static_cast<char>((i * 37 + 11) % 256);
    HttpClient client(gw.port());
    client.send_raw(noise + "\r\n\r\n");
    check_status_or_closed(client, 400);
  }
  check_still_serving(gw.port(), key);
}

// The gateway's own routes read chunked bodies through Beast, which parses a
// chunk line only once its CRLF arrives: bare line feeds and endless chunk
// lines must be refused at once (400 and a close), not held until
// body_timeout (a minute here) and closed in silence.
TEST_CASE("chunked bodies with bare line feeds or endless chunk lines get 400 at once", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(config_with_limits("body_timeout: 60s")));
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);
  const std::string body = chat_body("echo", "hi");
  auto hex = [](std::size_t n) {
    char out[32];
    std::snprintf(out, sizeof out, "%zx", n);
    return std::string(out);
  };
  const std::string head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
                           "\r\nTransfer-Encoding: chunked\r\n\r\n";
  struct Case {
    std::string name, bytes;
  };
  const std::vector<Case> cases = {
      {"bare LF everywhere", hex(body.size()) + "\n" + body + "\n0\n\n"},
      {"a bare LF after the size, the rest still to come", hex(body.size()) + "\n" + body.substr(0, 5)},
      {"a bare LF after a trailer", hex(body.size()) + "\r\n" + body + "\r\n0\r\nX-T: 1\n"},
      {"a chunk extension longer than any header", "5;" + std::string(70'000, 'a')},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    HttpClient client(gw.port(), 20s);
    client.send_raw(head + c.bytes);
    auto r = client.read_response();
    REQUIRE(r);
    check_error(*r, 400, "bad_body");
    CHECK(client.wait_closed(10s));
  }
  // Well-formed chunked bodies still pass, trailers and all.
  HttpClient client(gw.port());
  REQUIRE(client.send_raw(head + hex(body.size()) + "\r\n" + body + "\r\n0\r\nX-T: 1\r\n\r\n"));
  auto r = client.read_response();
  REQUIRE(r);
  CHECK(r->status == 200);
  check_still_serving(gw.port(), key);
}

// RFC 9112 2.2: a server SHOULD ignore at least one empty line before a
// request line (clients that end a POST body with an extra CRLF).
TEST_CASE("empty lines before a request line are ignored, a flood of them is not", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  const std::string body = chat_body("echo", "after the body");
  REQUIRE(client.send_raw("\r\n" + post_head(key, body.size()) + body +
                          "\r\n\r\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"));
  auto first = client.read_response();
  REQUIRE(first);
  CHECK(first->status == 200);
  CHECK(first->json().at("choices").at(0).at("message").at("content") == "after the body");
  auto second = client.read_response();
  REQUIRE(second);
  CHECK(second->status == 200);
  CHECK(second->body == R"({"status":"ok"})");
  // Split across reads: a lone CR waits for its LF.
  REQUIRE(client.send_raw("\r"));
  std::this_thread::sleep_for(100ms);
  REQUIRE(client.send_raw("\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"));
  auto third = client.read_response();
  REQUIRE(third);
  CHECK(third->status == 200);
  // Past a few, empty lines are garbage: 400 and a close.
  HttpClient flood(gw.port());
  std::string lines;
  for (int i = 0; i < 20; ++i) lines += "\r\n";
  REQUIRE(flood.send_raw(lines + "GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"));
  check_status_or_closed(flood, 400);
}

TEST_CASE("two pipelined requests in one send are answered in order", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  auto one = chat_body("echo", "first request");
  auto two = chat_body("echo", "second request");
  HttpClient client(gw.port());
  REQUIRE(client.send_raw(post_head(key, one.size()) + one + post_head(key, two.size()) + two));
  auto r1 = client.read_response();
  auto r2 = client.read_response();
  REQUIRE(r1);
  REQUIRE(r2);
  CHECK(r1->status == 200);
  CHECK(r2->status == 200);
  CHECK(r1->json().at("choices").at(0).at("message").at("content") == "first request");
  CHECK(r2->json().at("choices").at(0).at("message").at("content") == "second request");
  // Still the same open connection.
  CHECK(client.get("/healthz").status == 200);
}

TEST_CASE("Expect: 100-continue gets 100 Continue, then the answer", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  auto body = chat_body("echo", "continue please");
  HttpClient client(gw.port());
  REQUIRE(client.send_raw(post_head(key, body.size(), "Expect: 100-continue\r\n")));
  std::string interim;
  auto deadline = Clock::now() + 10s;
  while (interim.find("\r\n\r\n") == std::string::npos && Clock::now() < deadline) interim += client.read_some(200ms);
  CHECK(interim.starts_with("HTTP/1.1 100 Continue\r\n"));
  CHECK(interim.ends_with("\r\n\r\n"));  // nothing but the interim response yet
  REQUIRE(client.send_raw(body));
  auto r = client.read_response();
  REQUIRE(r);
  CHECK(r->status == 200);
  CHECK(r->json().at("choices").at(0).at("message").at("content") == "continue please");
}

TEST_CASE("an idle keep-alive connection is closed after idle_timeout", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(config_with_limits("idle_timeout: 1s")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  HttpClient client(gw.port());
  auto r = client.get("/healthz");
  CHECK(r.status == 200);
  CHECK(r.header("connection") != "close");
  auto answered = Clock::now();
  CHECK(client.wait_closed(15s));
  // Closing before the timeout would drop keep-alive clients that are merely thinking.
  CHECK(Clock::now() - answered >= 900ms);
  check_still_serving(gw.port(), key);
}

TEST_CASE("connections past max_connections are closed at once, the first ones keep working", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(config_with_limits("max_connections: 5")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  // The connections of wait_for_key may take a moment to be counted out, so a
  // refused early connection is retried.
  std::vector<std::unique_ptr<HttpClient>> held;
  auto deadline = Clock::now() + 15s;
  while (held.size() < 5 && Clock::now() < deadline) {
    auto client = std::make_unique<HttpClient>(gw.port());
    try {
      if (client->get("/healthz").status == 200) {
        held.push_back(std::move(client));
        continue;
      }
    } catch (const std::exception&) {
    }
    std::this_thread::sleep_for(50ms);
  }
  REQUIRE(held.size() == 5);

  std::vector<std::unique_ptr<HttpClient>> extra;
  for (int i = 0; i < 5; ++i) extra.push_back(std::make_unique<HttpClient>(gw.port()));
  for (auto& client : extra) {
    client->send_raw("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    CHECK(client->wait_closed(10s));
  }
  for (auto& client : held) CHECK(client->get("/healthz").status == 200);

  held.clear();
  extra.clear();
  // Slots free up as the sessions notice the closes.
  bool served = false;
  deadline = Clock::now() + 15s;
  while (!served && Clock::now() < deadline) {
    try {
      HttpClient client(gw.port());
      served = client.post("/v1/chat/completions", key, chat_body("echo", "room again")).status == 200;
    } catch (const std::exception&) {
    }
    if (!served) std::this_thread::sleep_for(50ms);
  }
  CHECK(served);
}

TEST_CASE("wrong method gets 405 and an unknown path 404, as JSON", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  HttpClient client(gw.port());
  check_error(client.get("/v1/chat/completions", key), 405, "method_not_allowed");
  check_error(client.get("/v1/completions", key), 405, "method_not_allowed");
  auto post_models = client.post("/v1/models", key, "{}");
  check_error(post_models, 405, "method_not_allowed");
  CHECK(post_models.header("allow") == "GET, HEAD");
  CHECK(client.get("/v1/completions", key).header("allow") == "POST");
  // HEAD: GET's status and headers without the body, on the read-only routes.
  {
    HttpClient raw(gw.port());
    REQUIRE(
        raw.send_raw("HEAD /healthz HTTP/1.1\r\nHost: h\r\n\r\nHEAD /v1/models HTTP/1.1\r\nHost: h\r\n"
                     "Authorization: Bearer " +
                     key +
                     "\r\n\r\nHEAD /v1/completions HTTP/1.1\r\nHost: h\r\n"
                     "Authorization: Bearer " +
                     key + "\r\n\r\nGET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"));
    std::string all;
    for (int i = 0; i < 30 && all.find("{\"status\":\"ok\"}") == std::string::npos; ++i) all += raw.read_some(100ms);
    INFO(all);
    // Four answers in order; only the last (the GET) has a body.
    const auto first = all.find("HTTP/1.1 200 OK\r\n");
    const auto second = all.find("HTTP/1.1 200 OK\r\n", first + 1);
    const auto third = all.find("HTTP/1.1 405 Method Not Allowed\r\n", second + 1);
    const auto fourth = all.find("HTTP/1.1 200 OK\r\n", third + 1);
    REQUIRE(fourth != std::string::npos);
    CHECK(all.substr(0, second).ends_with("\r\n\r\n"));
    CHECK(all.substr(second, third - second).ends_with("\r\n\r\n"));
    CHECK(all.substr(third, fourth - third).ends_with("\r\n\r\n"));
    CHECK(all.substr(first, second - first).find("Content-Length: 15\r\n") != std::string::npos);
    CHECK(all.ends_with("\r\n\r\n{\"status\":\"ok\"}"));
  }
  check_error(client.get("/no/such/path", key), 404);
  check_error(client.post("/v1/nothing", key, "{}"), 404);
  check_error(client.get("/no/such/path"), 404);
  // A long unknown path is quoted in part, not echoed whole.
  auto long_path = client.get("/no/" + std::string(12000, 'p'), key);
  check_error(long_path, 404);
  CHECK(long_path.body.size() < 600);
  check_still_serving(gw.port(), key);
}

TEST_CASE("a huge model name is a short 400, and no client string grows the database", "[e2e][bad_input]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config("metering: {flush_interval: 50ms}\n" + config_with_limits("max_body: 4MiB")));
  auto key = create_key(gw.db(), "mallory");
  wait_for_key(gw.port(), key);
  const std::string huge(1'000'000, 'm');
  auto db_bytes = [&] {
    std::uintmax_t total = 0;
    for (const char* suffix : {"", "-wal"}) {
      std::error_code ec;
      auto size = std::filesystem::file_size(gw.db() + suffix, ec);
      if (!ec) total += size;
    }
    return total;
  };
  const auto before = db_bytes();

  HttpClient client(gw.port());
  const std::vector<std::pair<std::string, std::string>> requests = {
      {"/v1/chat/completions", chat_body(huge, "hi")},
      {"/v1/completions", R"({"model":")" + huge + R"(","prompt":"hi"})"},
      {"/v1/embeddings", R"({"model":")" + huge + R"(","input":"hi"})"},
  };
  for (const auto& [route, body] : requests) {
    INFO(route);
    auto r = client.post(route, key, body);
    check_error(r, 400, "string_above_max_length");
    CHECK(r.json().at("error").at("param") == "model");
    CHECK(r.body.size() < 1000);
  }
  // A name under the bound that no model has: 404, quoting only its first 64 bytes.
  const std::string long_unknown = std::string(64, 'u') + std::string(190, 'v');
  auto unknown = client.post("/v1/chat/completions", key, chat_body(long_unknown, "hi"));
  check_error(unknown, 404, "model_not_found");
  const std::string message(unknown.json().at("error").at("message").as_string());
  CHECK(message.find(std::string(64, 'u') + "…") != std::string::npos);
  CHECK(message.find('v') == std::string::npos);

  // Every request is metered, none with more than the bound.
  const std::string completions = "route != '/v1/models'";  // wait_for_key's request has a row too
  for (int i = 0; i < 100 && count_usage_rows(gw.db(), completions) < 4; ++i) std::this_thread::sleep_for(50ms);
  CHECK(count_usage_rows(gw.db(), completions) == 4);
  CHECK(count_usage_rows(gw.db(), "length(model) > 256 OR length(route) > 512 OR length(backend) > 256") == 0);
  CHECK(count_usage_rows(gw.db(), "model = '" + long_unknown + "' AND status = 404") == 1);
  CHECK(db_bytes() < before + 256 * 1024);
  check_still_serving(gw.port(), key);
}
