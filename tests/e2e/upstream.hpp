// Test upstreams for the remote-backend tests: the fake OpenAI-compatible
// server (tests/e2e/fake_openai.py) as a child process, a test CA made with
// the openssl CLI, and small SSE and polling helpers.
#pragma once

#include <boost/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "harness.hpp"

namespace tollgate::test {

// A Python fake from tests/e2e as a child process: it binds a free loopback
// port and prints it as its first line; it goes when its stdin closes or at
// SIGKILL.
class FakeServer {
 public:
  FakeServer(const std::string& script, const std::vector<std::string>& args = {});
  ~FakeServer();
  FakeServer(const FakeServer&) = delete;
  FakeServer& operator=(const FakeServer&) = delete;

  std::uint16_t port() const { return port_; }

 private:
  int pid_ = -1;
  int stdin_fd_ = -1;
  std::uint16_t port_ = 0;
};

// fake_openai.py on a free loopback port; TLS when given a certificate and key.
class FakeOpenAI {
 public:
  explicit FakeOpenAI(const std::string& cert = "", const std::string& key = "");

  std::uint16_t port() const { return server_.port(); }
  // The last completion request it received: {path, headers, body} (plain HTTP only).
  boost::json::value last();
  // {requests, disconnects} (plain HTTP only).
  boost::json::value stats();

 private:
  FakeServer server_;
};

// A CA and a server certificate for 127.0.0.1 and localhost, made in `dir`.
struct TestCertificates {
  std::string ca;
  std::string cert;
  std::string key;
};
TestCertificates make_test_certificates(const TempDir& dir);

// A loopback port nothing listens on (bound, then closed).
std::uint16_t closed_port();

// The data of each SSE event in a body, in order ("[DONE]" included).
std::vector<std::string> sse_data(const std::string& body);

// Polls (bounded) until `where` matches exactly `n` usage rows; returns the last count.
std::int64_t wait_usage_rows(const std::string& db, const std::string& where, std::int64_t n);

}  // namespace tollgate::test
