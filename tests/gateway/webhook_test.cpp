// Webhooks: the signature, the SSRF address classifier and URL check as
// tables, and deliveries to an in-test receiver on 127.0.0.1 that scripts its
// answers and counts the connections it accepts. Only loopback is contacted;
// the only name resolved is "localhost".
#include "gateway/webhook.hpp"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <optional>

#include "gateway/webhook_address.hpp"

using namespace tollgate::gateway;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using SteadyClock = std::chrono::steady_clock;
using namespace std::chrono_literals;

TEST_CASE("webhook signature is t=<seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">", "[gateway][webhook]") {
  // Expected value computed independently with:
  // python3 -c 'import hmac,hashlib;print(hmac.new(b"whsec_test",
  //   b"1700000000.{\"job\":\"j_1\",\"status\":\"done\"}",hashlib.sha256).hexdigest())'
  CHECK(webhook_signature("whsec_test", 1700000000, R"({"job":"j_1","status":"done"})") ==
        "t=1700000000,v1=49f3da762ec2c1993a343ffbe96455e2483921383f9e55c7019ebbfaabb09147");
  // The timestamp is signed too.
  CHECK(webhook_signature("whsec_test", 1700000001, R"({"job":"j_1","status":"done"})").substr(16) !=
        webhook_signature("whsec_test", 1700000000, R"({"job":"j_1","status":"done"})").substr(16));
}

TEST_CASE("only public addresses may be webhook targets", "[gateway][webhook]") {
  struct Row {
    const char* address;
    bool is_public;
  };
  const Row rows[] = {
      {"8.8.8.8", true},
      {"1.1.1.1", true},
      {"93.184.216.34", true},
      {"172.32.0.1", true},   // just past 172.16/12
      {"100.128.0.1", true},  // just past 100.64/10
      {"2606:4700::1111", true},
      {"2a00:1450:4001::1", true},
      {"::ffff:8.8.8.8", true},
      {"64:ff9b::808:808", true},  // NAT64 of 8.8.8.8
      {"2002:808:808::1", true},   // 6to4 of 8.8.8.8
      {"127.0.0.1", false},
      {"127.255.255.254", false},
      {"0.0.0.0", false},
      {"10.1.2.3", false},
      {"172.16.0.1", false},
      {"172.31.255.255", false},
      {"192.168.1.1", false},
      {"169.254.169.254", false},  // cloud metadata
      {"169.254.0.1", false},
      {"100.64.0.1", false},
      {"100.127.255.255", false},
      {"224.0.0.1", false},
      {"239.255.255.250", false},
      {"255.255.255.255", false},
      {"240.0.0.1", false},
      {"192.0.2.1", false},
      {"198.18.0.1", false},
      {"::1", false},
      {"::", false},
      {"fc00::1", false},
      {"fd12:3456::1", false},
      {"fe80::1", false},
      {"ff02::1", false},
      {"::ffff:127.0.0.1", false},
      {"::ffff:169.254.169.254", false},
      {"::ffff:10.0.0.1", false},
      {"::127.0.0.1", false},          // IPv4-compatible (deprecated)
      {"64:ff9b::7f00:1", false},      // NAT64 of 127.0.0.1
      {"64:ff9b::a9fe:a9fe", false},   // NAT64 of 169.254.169.254
      {"2002:7f00:1::1", false},       // 6to4 of 127.0.0.1
      {"2002:c0a8:101::1", false},     // 6to4 of 192.168.1.1
      {"2001:db8::1", false},          // documentation
      {"2001:0:4136:e378::1", false},  // Teredo
      {"fec0::1", false},              // site-local
  };
  for (const auto& row : rows) {
    INFO(row.address);
    CHECK(is_public_address(net::ip::make_address(row.address)) == row.is_public);
  }
}

TEST_CASE("webhook URLs are checked at submission", "[gateway][webhook]") {
  const char* good[] = {
      "http://example.com/hook",       "https://hooks.example.com:8443/a/b?token=x",
      "https://EXAMPLE.com",
      "http://127.0.0.1:8080/",  // the address is judged at delivery, not here
      "http://[2606:4700::1111]/hook", "http://my_host.internal./x",
  };
  for (const auto* url : good) {
    INFO(url);
    CHECK_FALSE(check_webhook_url(url));
  }
  const char* bad[] = {
      "ftp://example.com/hook",
      "file:///etc/passwd",
      "gopher://example.com/",
      "http:///no-host",
      "http://",
      "example.com/hook",
      "/relative",
      "https://user:pass@example.com/",
      "https://user@example.com/",
      "http://example.com:0/",
      "http://example.com:65536/",
      "http://example.com:99999999/",
      "http://example.com:/",
      "http://example.com/#fragment",
      "http://2130706433/",
      "http://0x7f.1/",
      "http://0x7f000001/",
      "http://0177.0.0.1/",
      "http://127.1/",
      "http://exa%6Dple.com/",
      "http://[v1.fe80::1]/",
      "http://exa mple.com/",
      "",
  };
  for (const auto* url : bad) {
    INFO(url);
    CHECK(check_webhook_url(url));
  }
  std::string long_url = "https://example.com/" + std::string(2048, 'a');
  CHECK(check_webhook_url(long_url));
  CHECK_FALSE(check_webhook_url(long_url.substr(0, 2048)));
  // The message never quotes the URL: it may hold a token.
  auto message = check_webhook_url("https://user:secret@example.com/");
  REQUIRE(message);
  CHECK(message->find("secret") == std::string::npos);
}

namespace {

// A webhook receiver on 127.0.0.1: answers the n-th request with the n-th
// step of its script (the last step repeats) and records what it received.
struct Receiver {
  enum class Reply { status, silent, huge_headers };
  struct Step {
    Reply reply = Reply::status;
    int status = 200;
  };

  explicit Receiver(net::io_context& ioc) : acceptor(ioc, {net::ip::make_address("127.0.0.1"), 0}) {}

  std::string url(const std::string& host = "127.0.0.1") const {
    return "http://" + host + ":" + std::to_string(acceptor.local_endpoint().port()) + "/hooks/jobs?x=1";
  }

  tcp::acceptor acceptor;
  std::vector<Step> script{Step{}};
  int accepts = 0;
  std::vector<http::request<http::string_body>> requests;
};

net::awaitable<void> answer(Receiver& receiver, tcp::socket socket) {
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  http::request<http::string_body> request;
  auto [ec, n] = co_await http::async_read(stream, buffer, request, net::as_tuple(net::use_awaitable));
  if (ec) co_return;
  receiver.requests.push_back(request);
  auto index = std::min(receiver.requests.size(), receiver.script.size()) - 1;
  auto step = receiver.script[index];
  if (step.reply == Receiver::Reply::silent) {
    // Never answers: waits for the sender to give up and close.
    co_await http::async_read(stream, buffer, request, net::as_tuple(net::use_awaitable));
    co_return;
  }
  if (step.reply == Receiver::Reply::huge_headers) {
    std::string raw = "HTTP/1.1 200 OK\r\nX-Big: " + std::string(20'000, 'a') + "\r\nContent-Length: 0\r\n\r\n";
    co_await net::async_write(stream, net::buffer(raw), net::as_tuple(net::use_awaitable));
    co_return;
  }
  http::response<http::string_body> response{static_cast<http::status>(step.status), 11};
  if (step.status / 100 == 3) response.set(http::field::location, "http://127.0.0.1:1/elsewhere");
  response.body() = "ok";
  response.prepare_payload();
  co_await http::async_write(stream, response, net::as_tuple(net::use_awaitable));
}

net::awaitable<void> serve(Receiver& receiver) {
  for (;;) {
    auto [ec, socket] = co_await receiver.acceptor.async_accept(net::as_tuple(net::use_awaitable));
    if (ec) co_return;
    ++receiver.accepts;
    net::co_spawn(receiver.acceptor.get_executor(), answer(receiver, std::move(socket)), net::detached);
  }
}

// Runs one delivery on `ioc` to its end, for at most twenty seconds.
WebhookResult deliver(net::io_context& ioc, const std::string& url, const WebhookPolicy& policy,
                      const std::string& body = R"({"job":"j_1","status":"done"})") {
  std::optional<WebhookResult> out;
  net::co_spawn(ioc, deliver_webhook(url, "wh_123", body, policy), [&](std::exception_ptr e, WebhookResult r) {
    if (e) std::rethrow_exception(e);
    out = std::move(r);
  });
  ioc.restart();
  auto bound = SteadyClock::now() + 20s;
  while (!out && SteadyClock::now() < bound) ioc.run_one_for(10ms);
  REQUIRE(out);
  // Lets the receiver take whatever connection may still be pending.
  ioc.restart();
  ioc.run_for(50ms);
  return *out;
}

WebhookPolicy loopback_policy() {
  WebhookPolicy policy;
  policy.allow_private = true;
  policy.timeout = 2s;
  policy.first_backoff = 10ms;
  policy.max_backoff = 40ms;
  policy.secret = "whsec_test";
  return policy;
}

// Splits "t=<t>,v1=<hex>" and checks it against the body.
bool signature_matches(const std::string& header, const std::string& secret, const std::string& body) {
  if (header.rfind("t=", 0) != 0) return false;
  auto comma = header.find(",v1=");
  if (comma == std::string::npos) return false;
  auto t = std::stoll(header.substr(2, comma - 2));
  auto age =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count() - t;
  return age >= 0 && age < 60 && webhook_signature(secret, t, body) == header;
}

}  // namespace

TEST_CASE("a webhook arrives signed, and 500s are retried on fresh connections", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  receiver.script = {{Receiver::Reply::status, 500}, {Receiver::Reply::status, 503}, {Receiver::Reply::status, 200}};
  net::co_spawn(ioc, serve(receiver), net::detached);

  auto policy = loopback_policy();
  const std::string body = R"({"job":"j_1","status":"done"})";
  auto result = deliver(ioc, receiver.url(), policy, body);
  CHECK(result.delivered);
  CHECK(result.attempts == 3);
  CHECK(result.last_status == 200);
  CHECK(result.last_error.empty());
  CHECK(receiver.accepts == 3);
  REQUIRE(receiver.requests.size() == 3);
  for (const auto& request : receiver.requests) {
    CHECK(request.method() == http::verb::post);
    CHECK(request.target() == "/hooks/jobs?x=1");
    CHECK(request.body() == body);
    CHECK(request[http::field::content_type] == "application/json");
    CHECK(request[http::field::user_agent] == "tollgate-webhook");
    CHECK(request["Tollgate-Webhook-Id"] == "wh_123");
    CHECK(signature_matches(std::string(request["Tollgate-Signature"]), "whsec_test", body));
    CHECK_FALSE(signature_matches(std::string(request["Tollgate-Signature"]), "other_secret", body));
  }
}

TEST_CASE("a webhook without a secret is unsigned", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.secret.clear();
  auto result = deliver(ioc, receiver.url(), policy);
  CHECK(result.delivered);
  REQUIRE(receiver.requests.size() == 1);
  CHECK(receiver.requests[0].count("Tollgate-Signature") == 0);
}

TEST_CASE("webhook 4xx and 3xx answers end the delivery at once", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto status = GENERATE(400, 404, 302, 301);
  receiver.script = {{Receiver::Reply::status, status}};
  auto result = deliver(ioc, receiver.url(), loopback_policy());
  CHECK_FALSE(result.delivered);
  CHECK(result.attempts == 1);
  CHECK(result.last_status == status);
  CHECK(receiver.accepts == 1);  // the redirect was not followed
  CHECK(result.last_error.find(std::to_string(status)) != std::string::npos);
}

TEST_CASE("webhook 408 and 429 are retried until the attempts run out", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto status = GENERATE(408, 429, 500);
  receiver.script = {{Receiver::Reply::status, status}};
  auto policy = loopback_policy();
  policy.max_attempts = 3;
  auto result = deliver(ioc, receiver.url(), policy);
  CHECK_FALSE(result.delivered);
  CHECK(result.attempts == 3);
  CHECK(result.last_status == status);
  CHECK(receiver.accepts == 3);
}

TEST_CASE("webhook backoff doubles after each failure, up to its cap", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  receiver.script = {{Receiver::Reply::status, 503}};
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.max_attempts = 5;
  policy.first_backoff = 100ms;
  // Jitter keeps each wait in [b/2, b]. Doubled, the four waits take at least
  // 50 + 100 + 200 + 400 = 750 ms; capped at 100 ms, at most 400 ms.
  SECTION("doubled") {
    policy.max_backoff = 800ms;
    auto started = SteadyClock::now();
    auto result = deliver(ioc, receiver.url(), policy);
    auto took = SteadyClock::now() - started;
    CHECK(result.attempts == 5);
    CHECK(took >= 750ms);
    CHECK(took < 5s);
  }
  SECTION("capped") {
    policy.max_backoff = 100ms;
    auto started = SteadyClock::now();
    auto result = deliver(ioc, receiver.url(), policy);
    auto took = SteadyClock::now() - started;
    CHECK(result.attempts == 5);
    CHECK(took >= 200ms);
    CHECK(took < 650ms);  // 400 ms of waits, deliver()'s 50 ms drain, the attempts themselves
  }
}

TEST_CASE("a webhook receiver that never answers times out on every attempt", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  receiver.script = {{Receiver::Reply::silent, 0}};
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.timeout = 150ms;
  policy.max_attempts = 3;
  auto started = SteadyClock::now();
  auto result = deliver(ioc, receiver.url(), policy);
  auto took = SteadyClock::now() - started;
  CHECK_FALSE(result.delivered);
  CHECK(result.attempts == 3);
  CHECK(result.last_status == 0);
  CHECK(result.last_error.find("timed out") != std::string::npos);
  CHECK(receiver.accepts == 3);
  CHECK(took >= 3 * 150ms);
  CHECK(took < 5s);
}

TEST_CASE("a webhook answer with oversized headers is a failure", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  receiver.script = {{Receiver::Reply::huge_headers, 0}};
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.max_attempts = 2;
  auto result = deliver(ioc, receiver.url(), policy);
  CHECK_FALSE(result.delivered);
  CHECK(result.attempts == 2);
  CHECK(result.last_status == 0);
  CHECK(result.last_error.find("8 KiB") != std::string::npos);
}

TEST_CASE("a webhook over https to a plain receiver fails its TLS handshake", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.max_attempts = 1;
  auto url = receiver.url();
  url.replace(0, 4, "https");
  auto result = deliver(ioc, url, policy);
  CHECK_FALSE(result.delivered);
  CHECK(result.last_error.find("TLS handshake") != std::string::npos);
  CHECK(receiver.requests.empty());
}

TEST_CASE("webhooks to loopback are refused without a connection unless allowed", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.allow_private = false;

  SECTION("an IPv4 literal") {
    auto result = deliver(ioc, receiver.url(), policy);
    CHECK_FALSE(result.delivered);
    CHECK(result.attempts == 1);
    CHECK(result.last_error.find("refused") != std::string::npos);
    CHECK(result.last_error.find("127.0.0.1") != std::string::npos);
    CHECK(receiver.accepts == 0);
  }
  SECTION("an IPv4-mapped IPv6 literal") {
    auto result = deliver(ioc, receiver.url("[::ffff:127.0.0.1]"), policy);
    CHECK_FALSE(result.delivered);
    CHECK(result.last_error.find("refused") != std::string::npos);
    CHECK(receiver.accepts == 0);
  }
  SECTION("localhost") {
    auto result = deliver(ioc, receiver.url("localhost"), policy);
    CHECK_FALSE(result.delivered);
    CHECK(result.attempts == 1);
    CHECK(result.last_error.find("refused") != std::string::npos);
    CHECK(receiver.accepts == 0);
  }
  SECTION("localhost, listed in allow_hosts") {
    policy.allow_hosts = {"LocalHost"};
    auto result = deliver(ioc, receiver.url("localhost"), policy);
    CHECK(result.delivered);
    CHECK(receiver.accepts == 1);
    REQUIRE(receiver.requests.size() == 1);
    CHECK(receiver.requests[0][http::field::host] ==
          "localhost:" + std::to_string(receiver.acceptor.local_endpoint().port()));
  }
  SECTION("an allow_hosts entry does not cover other hosts") {
    policy.allow_hosts = {"localhost"};
    auto result = deliver(ioc, receiver.url(), policy);
    CHECK_FALSE(result.delivered);
    CHECK(receiver.accepts == 0);
  }
}

TEST_CASE("a bad webhook URL or id ends the delivery before any attempt", "[gateway][webhook]") {
  net::io_context ioc;
  auto result = deliver(ioc, "http://2130706433/", loopback_policy());
  CHECK_FALSE(result.delivered);
  CHECK(result.attempts == 0);
  CHECK(result.last_error.find("invalid webhook URL") != std::string::npos);

  Receiver receiver(ioc);
  net::co_spawn(ioc, serve(receiver), net::detached);
  std::optional<WebhookResult> out;
  net::co_spawn(ioc, deliver_webhook(receiver.url(), "bad\r\nX-Injected: 1", "{}", loopback_policy()),
                [&](std::exception_ptr, WebhookResult r) { out = std::move(r); });
  ioc.restart();
  ioc.run_for(200ms);
  REQUIRE(out);
  CHECK(out->attempts == 0);
  CHECK(out->last_error == "invalid webhook id");
  CHECK(receiver.accepts == 0);
}

TEST_CASE("a webhook waiting out its backoff ends when cancelled", "[gateway][webhook]") {
  net::io_context ioc;
  Receiver receiver(ioc);
  receiver.script = {{Receiver::Reply::status, 500}};
  net::co_spawn(ioc, serve(receiver), net::detached);
  auto policy = loopback_policy();
  policy.first_backoff = 60s;
  policy.max_backoff = 60s;
  bool finished = false;
  net::cancellation_signal cancel;
  WebhookResult result;
  net::co_spawn(ioc, deliver_webhook(receiver.url(), "wh_1", "{}", policy),
                net::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, WebhookResult r) {
                  if (e) std::rethrow_exception(e);
                  finished = true;
                  result = std::move(r);
                }));
  auto bound = SteadyClock::now() + 10s;
  while (receiver.requests.empty() && SteadyClock::now() < bound) ioc.run_one_for(10ms);
  ioc.run_for(100ms);  // the first attempt ends and the 60 s backoff starts
  REQUIRE(receiver.accepts == 1);
  REQUIRE_FALSE(finished);
  cancel.emit(net::cancellation_type::terminal);
  ioc.restart();
  ioc.run_for(200ms);
  CHECK(finished);
  CHECK(result.attempts == 1);
  CHECK(result.last_error == "cancelled");
}
