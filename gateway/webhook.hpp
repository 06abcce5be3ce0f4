// Job-end webhooks: a signed JSON POST to a URL the client chose, with
// retries, and refused when the URL's host is not a public address (SSRF).
// Self-contained: depends on nothing else in the gateway.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate::gateway {

// How a webhook is delivered and which targets it may reach.
struct WebhookPolicy {
  std::chrono::milliseconds timeout{10'000};  // per attempt: resolve, connect, TLS, write and read together
  int max_attempts = 5;
  std::chrono::milliseconds first_backoff{1'000};  // doubled after each failure, with jitter, up to max_backoff
  std::chrono::milliseconds max_backoff{60'000};
  bool allow_private = false;            // loopback, private and link-local targets too (tests, internal receivers)
  std::vector<std::string> allow_hosts;  // host names allowed even when they resolve to non-public addresses
  std::string secret;                    // the HMAC key; empty: unsigned
  std::string ca_file;                   // trusted in addition to the system store
  bool insecure_skip_verify = false;
};

// Checks a webhook URL when a job is submitted: http or https, a host (a DNS
// name, a dotted-quad or a bracketed IPv6 literal; no numeric shorthand like
// 2130706433 or 0x7f.1), no user info or fragment, a port in 1..65535, at most
// 2048 characters. An error message (which never quotes the URL) or nullopt.
std::optional<std::string> check_webhook_url(std::string_view url);

// The Tollgate-Signature value: "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>".
std::string webhook_signature(std::string_view secret, std::int64_t unix_seconds, std::string_view body);

// How a delivery ended.
struct WebhookResult {
  bool delivered = false;
  int attempts = 0;        // attempts started: 0 for a bad URL or id; a refused target counts 1 (no connection)
  int last_status = 0;     // the last attempt's HTTP status, 0 when it received none
  std::string last_error;  // empty when delivered
};

// POSTs `body` (application/json) to `url` with Tollgate-Webhook-Id, User-Agent
// and, when the policy has a secret, Tollgate-Signature. A 2xx delivers it;
// connection errors, timeouts, malformed answers, 408, 429 and 5xx are retried
// with backoff; other statuses (redirects included: never followed) and a
// refused target end it at once. A fresh connection per attempt. Run it on an
// executor that runs one handler at a time (an io_context run by one thread,
// or a strand); cancelling the coroutine ends it with last_error "cancelled".
boost::asio::awaitable<WebhookResult> deliver_webhook(std::string url, std::string id, std::string body,
                                                      WebhookPolicy policy);

}  // namespace tollgate::gateway
