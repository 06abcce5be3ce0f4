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

// fake_openai.py on a free loopback port; TLS when given a certificate and key.
class FakeOpenAI {
 public:
  explicit FakeOpenAI(const std::string& cert = "", const std::string& key = "");
  ~FakeOpenAI();
  FakeOpenAI(const FakeOpenAI&) = delete;
  FakeOpenAI& operator=(const FakeOpenAI&) = delete;

  std::uint16_t port() const { return port_; }
  // The last completion request it received: {path, headers, body} (plain HTTP only).
  boost::json::value last();
  // {requests, disconnects} (plain HTTP only).
  boost::json::value stats();

 private:
  int pid_ = -1;
  int stdin_fd_ = -1;
  std::uint16_t port_ = 0;
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
