#include "gateway/webhook.hpp"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/url/parse.hpp>
#include <cctype>
#include <memory>
#include <random>

#include "gateway/webhook_address.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using SteadyClock = std::chrono::steady_clock;
using boost::system::error_code;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

constexpr std::size_t kMaxUrlLength = 2048;
constexpr std::size_t kMaxIdLength = 256;
constexpr std::uint32_t kMaxAnswerHeader = 8 * 1024;
constexpr std::uint64_t kMaxAnswerBody = 64 * 1024;

// Where a webhook goes, from its checked URL.
struct WebhookTarget {
  bool tls = false;
  std::string host;                         // a DNS name, or an IP literal (IPv6 without brackets)
  std::optional<net::ip::address> literal;  // when the host is an IP literal
  std::uint16_t port = 0;
  std::string host_header;  // host[:port] as the URL spells it
  std::string target;       // path and query
};

bool iequals(std::string_view a, std::string_view b) {
  return std::ranges::equal(a, b, [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
  });
}

// A DNS name: letters, digits, '-' and '_' in dot-separated labels. A last
// label that is a number ("2130706433", "127.1", "0x7f.1") is refused:
// getaddrinfo would read such a name as an IPv4 address in shorthand.
std::optional<std::string> check_host_name(std::string_view host) {
  if (!host.empty() && host.back() == '.') host.remove_suffix(1);
  if (host.empty() || host.size() > 253) return "the host name is empty or longer than 253 characters";
  std::string_view last;
  for (std::size_t start = 0; start <= host.size();) {
    auto end = std::min(host.find('.', start), host.size());
    auto label = host.substr(start, end - start);
    if (label.empty() || label.size() > 63) return "the host name has an empty or overlong label";
    for (char c : label) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') {
        return "the host must be a DNS name or an IP address";
      }
    }
    last = label;
    start = end + 1;
  }
  bool all_digits = std::ranges::all_of(last, [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  bool hex = last.size() > 1 && last[0] == '0' && (last[1] == 'x' || last[1] == 'X');
  if (all_digits || hex) return "the host must be a dotted-quad IPv4 address, not a numeric shorthand";
  return std::nullopt;
}

// Parses and checks a webhook URL. Errors never quote the URL: it may hold a token.
std::optional<WebhookTarget> parse_target(std::string_view url, std::string& error) {
  if (url.size() > kMaxUrlLength) {
    error = "the URL is longer than 2048 characters";
    return std::nullopt;
  }
  auto parsed = boost::urls::parse_absolute_uri(url);
  if (!parsed) {
    error = "not an absolute URL";
    return std::nullopt;
  }
  WebhookTarget t;
  if (parsed->scheme_id() == boost::urls::scheme::https) {
    t.tls = true;
  } else if (parsed->scheme_id() != boost::urls::scheme::http) {
    error = "the URL must start with http:// or https://";
    return std::nullopt;
  }
  if (!parsed->has_authority() || parsed->encoded_host().empty()) {
    error = "the URL names no host";
    return std::nullopt;
  }
  if (parsed->has_userinfo()) {
    error = "the URL must not hold user info";
    return std::nullopt;
  }
  if (parsed->has_fragment()) {
    error = "the URL must not have a fragment";
    return std::nullopt;
  }
  switch (parsed->host_type()) {
    case boost::urls::host_type::ipv4:
      t.literal = net::ip::address_v4(parsed->host_ipv4_address().to_uint());
      t.host = t.literal->to_string();
      break;
    case boost::urls::host_type::ipv6:
      t.literal = net::ip::address_v6(parsed->host_ipv6_address().to_bytes());
      t.host = t.literal->to_string();
      break;
    case boost::urls::host_type::name:
      if (auto bad = check_host_name(parsed->encoded_host())) {
        error = *bad;
        return std::nullopt;
      }
      t.host = std::string(parsed->encoded_host());
      break;
    default:
      error = "the host must be a DNS name or an IP address";
      return std::nullopt;
  }
  t.port = t.tls ? 443 : 80;
  if (parsed->has_port()) {
    auto port = parsed->port();  // digits only, by the URL grammar
    unsigned value = 0;
    if (port.empty() || port.size() > 5 || (value = static_cast<unsigned>(std::stoul(std::string(port)))) == 0 ||
        value > 65535) {
      error = "the port must be in 1..65535";
      return std::nullopt;
    }
    t.port = static_cast<std::uint16_t>(value);
  }
  t.host_header = std::string(parsed->encoded_host_and_port());
  t.target = std::string(parsed->encoded_target());
  if (t.target.empty() || t.target.front() != '/') t.target.insert(0, "/");
  return t;
}

// Visible ASCII only: the id goes into a header.
bool valid_id(std::string_view id) {
  return !id.empty() && id.size() <= kMaxIdLength && std::ranges::all_of(id, [](char c) { return c > ' ' && c < 127; });
}

// What one attempt came to.
struct Attempt {
  bool delivered = false;
  bool retry = false;
  int status = 0;
  std::string error;
};

Attempt retryable(std::string what, const error_code& ec) {
  if (ec == beast::error::timeout) return {false, true, 0, what + ": timed out"};
  if (ec == http::error::header_limit) return {false, true, 0, what + ": the answer's headers exceed 8 KiB"};
  return {false, true, 0, what + ": " + ec.message()};
}

Attempt from_status(int status) {
  if (status >= 200 && status < 300) return {true, false, status, ""};
  auto error = "the receiver answered " + std::to_string(status);
  if (status == 408 || status == 429 || status >= 500) return {false, true, status, error};
  if (status >= 300 && status < 400) error += " (redirects are not followed)";
  return {false, false, status, error};
}

// Why `endpoints` may not be reached, or nullopt when they all may.
std::optional<std::string> refusal(const WebhookTarget& target, const std::vector<tcp::endpoint>& endpoints,
                                   const WebhookPolicy& policy) {
  if (policy.allow_private) return std::nullopt;
  if (std::ranges::any_of(policy.allow_hosts, [&](const std::string& h) { return iequals(h, target.host); })) {
    return std::nullopt;
  }
  for (const auto& endpoint : endpoints) {
    if (!is_public_address(endpoint.address())) {
      return "refused: " + target.host + " is or resolves to the non-public address " + endpoint.address().to_string();
    }
  }
  return std::nullopt;
}

// A lookup's result, shared with its completion handler.
struct Lookup {
  explicit Lookup(const net::any_io_executor& ex) : done(ex) {}
  net::steady_timer done;  // cancelled when the lookup completes
  bool finished = false;
  error_code ec;
  tcp::resolver::results_type results;
};

// getaddrinfo cannot be interrupted, so a lookup still running at the deadline
// is abandoned rather than awaited: its handler fills a Lookup nobody reads.
net::awaitable<std::optional<Attempt>> resolve(const WebhookTarget& target, SteadyClock::time_point deadline,
                                               std::vector<tcp::endpoint>& endpoints) {
  auto ex = co_await net::this_coro::executor;
  tcp::resolver resolver(ex);
  auto lookup = std::make_shared<Lookup>(ex);
  lookup->done.expires_at(deadline);
  resolver.async_resolve(target.host, std::to_string(target.port), tcp::resolver::numeric_service,
                         net::bind_executor(ex, [lookup](error_code ec, tcp::resolver::results_type results) {
                           lookup->finished = true;
                           lookup->ec = ec;
                           lookup->results = std::move(results);
                           lookup->done.cancel();
                         }));
  co_await lookup->done.async_wait(as_tuple);
  if (!lookup->finished) co_return retryable("cannot resolve " + target.host, beast::error::timeout);
  if (lookup->ec) co_return retryable("cannot resolve " + target.host, lookup->ec);
  for (const auto& entry : lookup->results) endpoints.push_back(entry.endpoint());
  if (endpoints.empty()) co_return Attempt{false, true, 0, "cannot resolve " + target.host + ": no addresses"};
  co_return std::nullopt;
}

// Sends the request and reads the status; the body is read (bounded) and dropped.
template <class Stream>
net::awaitable<Attempt> exchange(Stream& stream, http::request<http::string_body>& request) {
  auto [wec, written] = co_await http::async_write(stream, request, as_tuple);
  if (wec) co_return retryable("cannot send the webhook", wec);
  beast::flat_buffer buffer(2 * kMaxAnswerHeader);
  http::response_parser<http::string_body> parser;
  parser.header_limit(kMaxAnswerHeader);
  parser.body_limit(kMaxAnswerBody);
  auto [rec, read] = co_await http::async_read_header(stream, buffer, parser, as_tuple);
  if (rec) co_return retryable("no valid answer", rec);
  // The status decides. Errors while draining the body (too long, truncated,
  // a TLS peer closing without close_notify) change nothing.
  if (!parser.is_done()) co_await http::async_read(stream, buffer, parser, as_tuple);
  co_return from_status(parser.get().result_int());
}

net::awaitable<Attempt> attempt_delivery(const WebhookTarget& target, const std::string& id, const std::string& body,
                                         const WebhookPolicy& policy, ssl::context* tls) {
  auto ex = co_await net::this_coro::executor;
  auto deadline = SteadyClock::now() + policy.timeout;
  std::vector<tcp::endpoint> endpoints;
  if (target.literal) {
    endpoints.emplace_back(*target.literal, target.port);
  } else if (auto failed = co_await resolve(target, deadline, endpoints)) {
    co_return *failed;
  }
  // Every address is checked, and only checked addresses are connected to.
  if (auto refused = refusal(target, endpoints, policy)) co_return Attempt{false, false, 0, *refused};

  http::request<http::string_body> request{http::verb::post, target.target, 11};
  request.set(http::field::host, target.host_header);
  request.set(http::field::user_agent, "tollgate-webhook");
  request.set(http::field::content_type, "application/json");
  request.set(http::field::connection, "close");
  request.set("Tollgate-Webhook-Id", id);
  if (!policy.secret.empty()) {
    auto now = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch());
    request.set("Tollgate-Signature", webhook_signature(policy.secret, now.count(), body));
  }
  request.body() = body;
  request.prepare_payload();

  auto where = target.host + ":" + std::to_string(target.port);
  if (!tls) {
    beast::tcp_stream stream(ex);
    stream.expires_at(deadline);
    auto [ec, endpoint] = co_await stream.async_connect(endpoints, as_tuple);
    if (ec) co_return retryable("cannot connect to " + where, ec);
    co_return co_await exchange(stream, request);
  }
  beast::ssl_stream<beast::tcp_stream> stream(ex, *tls);
  auto& lowest = beast::get_lowest_layer(stream);
  lowest.expires_at(deadline);
  auto [ec, endpoint] = co_await lowest.async_connect(endpoints, as_tuple);
  if (ec) co_return retryable("cannot connect to " + where, ec);
  // SNI is for names only; an IP literal is matched against the certificate's IP SANs.
  if (!target.literal && !SSL_set_tlsext_host_name(stream.native_handle(), target.host.c_str())) {
    co_return Attempt{false, false, 0, "cannot set the TLS server name"};
  }
  if (!policy.insecure_skip_verify) stream.set_verify_callback(ssl::host_name_verification(target.host));
  auto [hec] = co_await stream.async_handshake(ssl::stream_base::client, as_tuple);
  if (hec) co_return retryable("TLS handshake with " + where + " failed", hec);
  co_return co_await exchange(stream, request);
}

// Uniform in [backoff/2, backoff], so receivers recovering from an outage are
// not hit by every sender at once.
std::chrono::milliseconds jittered(std::chrono::milliseconds backoff, std::mt19937& random) {
  auto half = backoff.count() / 2;
  std::uniform_int_distribution<std::int64_t> extra(0, backoff.count() - half);
  return std::chrono::milliseconds(half + extra(random));
}

net::awaitable<bool> cancelled() {
  auto state = co_await net::this_coro::cancellation_state;
  co_return state.cancelled() != net::cancellation_type::none;
}

}  // namespace

std::optional<std::string> check_webhook_url(std::string_view url) {
  std::string error;
  if (!parse_target(url, error)) return error;
  return std::nullopt;
}

std::string webhook_signature(std::string_view secret, std::int64_t unix_seconds, std::string_view body) {
  auto message = std::to_string(unix_seconds) + "." + std::string(body);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac, &length);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "t=" + std::to_string(unix_seconds) + ",v1=";
  for (unsigned int i = 0; i < length; ++i) {
    out += kHex[mac[i] >> 4];
    out += kHex[mac[i] & 0xf];
  }
  return out;
}

net::awaitable<WebhookResult> deliver_webhook(std::string url, std::string id, std::string body, WebhookPolicy policy) {
  // Cancellation ends the operation it reaches with an error; the loop below
  // then stops, instead of the next co_await throwing.
  co_await net::this_coro::throw_if_cancelled(false);
  WebhookResult result;
  std::string error;
  auto target = parse_target(url, error);
  if (!target) {
    result.last_error = "invalid webhook URL: " + error;
    co_return result;
  }
  if (!valid_id(id)) {
    result.last_error = "invalid webhook id";
    co_return result;
  }
  std::optional<ssl::context> tls;
  if (target->tls) {
    tls.emplace(ssl::context::tls_client);
    error_code ec;
    tls->set_default_verify_paths(ec);
    if (!ec && !policy.ca_file.empty()) tls->load_verify_file(policy.ca_file, ec);
    if (ec) {
      result.last_error = "cannot load the trusted certificates: " + ec.message();
      co_return result;
    }
    tls->set_verify_mode(policy.insecure_skip_verify ? ssl::verify_none : ssl::verify_peer);
  }

  net::steady_timer pause(co_await net::this_coro::executor);
  std::mt19937 random(std::random_device{}());
  auto cap = std::max(policy.max_backoff, std::chrono::milliseconds(0));
  auto backoff = std::min(std::max(policy.first_backoff, std::chrono::milliseconds(0)), cap);
  auto max_attempts = std::max(policy.max_attempts, 1);
  for (int attempt = 1;; ++attempt) {
    result.attempts = attempt;
    auto outcome = co_await attempt_delivery(*target, id, body, policy, tls ? &*tls : nullptr);
    if (co_await cancelled()) {
      result.last_error = "cancelled";
      co_return result;
    }
    result.last_status = outcome.status;
    result.last_error = std::move(outcome.error);
    result.delivered = outcome.delivered;
    if (outcome.delivered || !outcome.retry || attempt >= max_attempts) co_return result;
    pause.expires_after(jittered(backoff, random));
    backoff = std::min(backoff * 2, cap);
    auto [ec] = co_await pause.async_wait(as_tuple);
    if (ec) {
      result.last_error = "cancelled";
      co_return result;
    }
  }
}

}  // namespace tollgate::gateway
