// Graceful shutdown through the real binary: SIGTERM lets in-flight streams
// finish, refuses new connections, exits 0, and loses no usage row.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include "harness.hpp"

using namespace tollgate::test;

namespace {

using Clock = std::chrono::steady_clock;

// Options with a config file (designated initialisers would leave fields unnamed).
GatewayProcess::Options with_config(std::string yaml) {
  GatewayProcess::Options options;
  options.config_yaml = std::move(yaml);
  return options;
}

std::string echo_config(const std::string& token_delay, const std::string& limits = "") {
  return (limits.empty() ? "" : "limits: {" + limits + "}\n") +
         "backends:\n"
         "  - {name: echo, type: echo, token_delay: " + token_delay + "}\n"
         "models:\n"
         "  - name: echo\n"
         "    deployments: [{backend: echo}]\n";
}

std::string words(int n) {
  std::string text;
  for (int i = 0; i < n; ++i) text += (i ? " w" : "w") + std::to_string(i);
  return text;
}

bool can_connect(std::uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return ok;
}

// Alive and not a zombie: the process is still serving, not merely unreaped.
bool process_alive(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  char state = stat[paren + 2];
  return state != 'Z' && state != 'X';
}

std::string stream_request(const std::string& key, const std::string& content) {
  auto body = chat_body("echo", content, R"("stream":true,"stream_options":{"include_usage":true})");
  return "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

// Reads raw bytes until `needle` shows up (bounded); returns all that was read.
std::string read_until(HttpClient& client, const std::string& needle, std::chrono::seconds bound) {
  std::string seen;
  auto deadline = Clock::now() + bound;
  while (seen.find(needle) == std::string::npos && Clock::now() < deadline) seen += client.read_some(200ms);
  return seen;
}

// The streamed text, from the chunked SSE bytes: each delta's "content".
std::string streamed_content(const std::string& raw) {
  std::string text;
  std::size_t pos = 0;
  while ((pos = raw.find("data: {", pos)) != std::string::npos) {
    auto end = raw.find("\n\n", pos);
    if (end == std::string::npos) break;
    auto v = boost::json::parse(raw.substr(pos + 6, end - pos - 6));
    pos = end;
    const auto& choices = v.at("choices").as_array();
    if (choices.empty()) continue;
    if (const auto* delta = choices[0].as_object().if_contains("delta")) {
      if (const auto* c = delta->as_object().if_contains("content"); c && c->is_string()) text += c->as_string();
    }
  }
  return text;
}

}  // namespace

TEST_CASE("SIGTERM lets an in-flight stream finish, refuses new connections, exits 0, meters it",
          "[e2e][shutdown]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(echo_config("50ms")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  const auto content = words(20);

  HttpClient client(gw.port(), 30s);
  REQUIRE(client.send_raw(stream_request(key, content)));
  std::string raw = read_until(client, "data: {", 10s);
  REQUIRE(raw.find("data: {") != std::string::npos);

  int pid = gw.pid();
  REQUIRE(pid > 0);
  auto stopped = std::async(std::launch::async, [&gw] { return gw.stop(SIGTERM, 60s); });

  // New connections are refused while the process is still up, finishing the stream.
  auto deadline = Clock::now() + 10s;
  bool refused = false;
  while (!refused && Clock::now() < deadline) {
    refused = !can_connect(gw.port());
    if (!refused) std::this_thread::sleep_for(5ms);
  }
  bool alive_when_refused = process_alive(pid);
  CHECK(refused);

  raw += read_until(client, "data: [DONE]", 30s);
  CHECK(raw.find("data: [DONE]\n\n") != std::string::npos);
  CHECK(streamed_content(raw) == content);
  CHECK(raw.find(R"("completion_tokens":20)") != std::string::npos);
  // The stream was the last thing the process did: it ends with the chunked terminator.
  raw += read_until(client, "0\r\n\r\n", 10s);
  CHECK(raw.ends_with("0\r\n\r\n"));

  CHECK(stopped.get() == 0);
  CHECK(alive_when_refused);
  CHECK(count_usage_rows(gw.db(), "route = '/v1/chat/completions' AND status = 200 AND completion_tokens = 20") == 1);
}

TEST_CASE("past shutdown_grace a long stream is cut and the process still exits 0 with earlier rows",
          "[e2e][shutdown]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(echo_config("200ms", "shutdown_grace: 1s")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  // Two completed requests whose rows must survive the forced stop.
  for (int i = 0; i < 2; ++i) {
    HttpClient done(gw.port());
    auto r = done.post("/v1/chat/completions", key, chat_body("echo", "short one"));
    REQUIRE(r.status == 200);
  }

  HttpClient client(gw.port(), 30s);
  REQUIRE(client.send_raw(stream_request(key, words(100))));  // 20 s of tokens
  REQUIRE(read_until(client, "data: {", 10s).find("data: {") != std::string::npos);

  // The grace is 1 s; the bound only guards against a hang.
  auto stopped = std::async(std::launch::async, [&gw] { return gw.stop(SIGTERM, 20s); });
  // The cut stream is told why it ends.
  auto tail = read_until(client, "shutting down", 10s);
  CHECK(tail.find("data: {\"error\"") != std::string::npos);
  CHECK(tail.find("shutting down") != std::string::npos);
  CHECK(stopped.get() == 0);
  CHECK(client.wait_closed(10s));
  CHECK(count_usage_rows(gw.db(), "route = '/v1/chat/completions' AND status = 200 AND completion_tokens = 2") == 2);
  // The cut stream never reported all 100 tokens as delivered, but what it got is metered.
  CHECK(count_usage_rows(gw.db(), "completion_tokens = 100") == 0);
  CHECK(count_usage_rows(gw.db(), "status = 503 AND completion_tokens > 0") == 1);
}

TEST_CASE("a client gone mid-stream is metered as 499 with the tokens it got", "[e2e][shutdown]") {
  TempDir dir;
  GatewayProcess gw(dir, with_config(echo_config("50ms")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  {
    HttpClient client(gw.port());
    REQUIRE(client.send_raw(stream_request(key, words(40))));
    REQUIRE(read_until(client, "data: {", 10s).find("data: {") != std::string::npos);
  }  // closes the socket after the first chunk

  // The gateway notices on its next write; poll for the row before stopping so
  // the stop does not race the notice.
  auto deadline = Clock::now() + 20s;
  while (Clock::now() < deadline && count_usage_rows(gw.db(), "status = 499") == 0) {
    std::this_thread::sleep_for(50ms);
  }
  CHECK(gw.stop(SIGTERM, 30s) == 0);
  CHECK(count_usage_rows(gw.db(), "status = 499") == 1);
  CHECK(count_usage_rows(gw.db(), "status = 499 AND completion_tokens >= 1 AND completion_tokens < 40") == 1);
  CHECK(count_usage_rows(gw.db(), "route = '/v1/chat/completions' AND status = 200") == 0);
}
