#include "gateway/http_rules.hpp"

#include <boost/beast/core/string.hpp>
#include <boost/beast/http/field.hpp>

namespace tollgate::gateway {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;

std::string_view view(beast::string_view s) { return {s.data(), s.size()}; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool iequal(std::string_view a, std::string_view b) { return a.size() == b.size() && beast::iequals(a, b); }

// Calls f(element) for each non-empty element of a comma-separated list.
template <class F>
void for_each_element(std::string_view list, F&& f) {
  while (!list.empty()) {
    auto comma = list.find(',');
    auto element = trim(list.substr(0, comma));
    if (!element.empty()) f(element);
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
}

bool is_alnum(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// RFC 3986 reg-name, IP literal and port characters; no userinfo ('@'), no
// list (','), no path, query or whitespace.
bool is_authority(std::string_view host) {
  for (char c : host) {
    if (is_alnum(c)) continue;
    switch (c) {
      case '-':
      case '.':
      case '_':
      case '~':
      case '!':
      case '$':
      case '&':
      case '\'':
      case '(':
      case ')':
      case '*':
      case '+':
      case ';':
      case '=':
      case ':':
      case '[':
      case ']':
      case '%':
        continue;
      default:
        return false;
    }
  }
  return true;
}

// "http://authority/path?query": the authority, or nullopt when the target is
// not in absolute form with an http(s) scheme.
std::optional<std::string_view> absolute_authority(std::string_view target) {
  auto colon = target.find("://");
  if (colon == std::string_view::npos) return std::nullopt;
  auto scheme = target.substr(0, colon);
  if (!iequal(scheme, "http") && !iequal(scheme, "https")) return std::nullopt;
  auto rest = target.substr(colon + 3);
  return rest.substr(0, rest.find_first_of("/?"));
}

HeadViolation violation(std::string message, int status = 400) { return {status, std::move(message), "bad_http"}; }

}  // namespace

std::string_view origin_form(std::string_view target) {
  if (target.empty() || target.front() == '/') return target;
  if (auto authority = absolute_authority(target)) {
    auto start = target.find("://") + 3 + authority->size();
    return target.substr(start);
  }
  return target;
}

std::string_view target_path(std::string_view target) {
  auto origin = origin_form(target);
  return origin.substr(0, origin.find('?'));
}

std::optional<HeadViolation> check_request_head(const http::request_header<>& req) {
  const unsigned version = req.version();
  if (version != 10 && version != 11) return violation("only HTTP/1.0 and HTTP/1.1 are served", 505);
  if (req.method() == http::verb::connect) return violation("CONNECT is not served", 405);

  int hosts = 0, authorizations = 0, api_keys = 0;
  std::string_view host;
  int transfer_encodings = 0, chunked = 0, other_codings = 0;
  bool chunked_last = false;
  for (const auto& f : req) {
    auto name = view(f.name_string());
    auto value = view(f.value());
    if (name.empty()) return violation("an empty header name");
    for (char c : value) {
      auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && c != '\t') || u == 0x7f)
        return violation("a control character in the header '" + std::string(name.substr(0, 64)) + "'");
    }
    switch (f.name()) {
      case http::field::host:
        ++hosts;
        host = value;
        break;
      case http::field::authorization:
        ++authorizations;
        break;
      case http::field::transfer_encoding:
        ++transfer_encodings;
        chunked_last = false;  // until this line's last element says otherwise
        for_each_element(value, [&](std::string_view coding) {
          if (iequal(coding, "chunked")) {
            ++chunked;
            chunked_last = true;
          } else {
            ++other_codings;
            chunked_last = false;
          }
        });
        break;
      case http::field::expect:
        if (!iequal(trim(value), "100-continue")) return violation("only 'Expect: 100-continue' is understood", 417);
        break;
      default:
        if (iequal(name, "x-api-key")) ++api_keys;
        break;
    }
  }

  if (transfer_encodings > 0) {
    if (version == 10) return violation("Transfer-Encoding in an HTTP/1.0 request");
    if (!chunked_last) return violation("a request body's last transfer coding must be chunked");
    if (chunked > 1) return violation("chunked is applied more than once");
    if (other_codings > 0) return violation("transfer codings other than chunked are not implemented", 501);
  }

  if (hosts > 1) return violation("more than one Host header");
  if (hosts == 0 && version == 11) return violation("an HTTP/1.1 request needs a Host header");
  if (!is_authority(host)) return violation("a malformed Host header");
  if (authorizations > 1) return violation("more than one Authorization header");
  if (api_keys > 1) return violation("more than one x-api-key header");

  auto target = view(req.target());
  if (target.find('#') != std::string_view::npos) return violation("a fragment in the request target");
  if (target == "*") {
    if (req.method() != http::verb::options) return violation("the target '*' is for OPTIONS only");
  } else if (target.empty() || target.front() != '/') {
    auto authority = absolute_authority(target);
    if (!authority) return violation("the request target must be a path or an http(s) URL");
    if (authority->empty() || !is_authority(*authority))
      return violation("a malformed authority in the request target");
    if (hosts == 1 && !iequal(*authority, host)) return violation("the request target's authority differs from Host");
    auto origin = origin_form(target);
    if (origin.empty() || origin.front() != '/') return violation("an absolute request target needs a path");
  }
  return std::nullopt;
}

bool is_public_path(const std::vector<std::string>& patterns, std::string_view path) {
  if (path.find_first_of("%;\\") != std::string_view::npos || path.find("//") != std::string_view::npos) return false;
  for (auto i = path.find("/."); i != std::string_view::npos; i = path.find("/.", i + 1)) {
    auto rest = path.substr(i + 2);
    if (rest.empty() || rest.front() == '/' || (rest.front() == '.' && (rest.size() == 1 || rest[1] == '/'))) {
      return false;
    }
  }
  for (const auto& p : patterns) {
    std::string_view pattern = p;
    if (pattern.ends_with('*') ? path.starts_with(pattern.substr(0, pattern.size() - 1)) : path == pattern) {
      return true;
    }
  }
  return false;
}

bool holds_tollgate_key(std::string_view value, std::string_view presented) {
  if (!presented.empty() && value.find(presented) != std::string_view::npos) return true;
  // Shorter runs than a real key's 32 still count: a truncated key is a secret too.
  constexpr std::size_t kMinRun = 16;
  for (std::size_t at = 0; at + 3 <= value.size(); ++at) {
    if (!beast::iequals(value.substr(at, 3), "tg-")) continue;
    auto rest = value.substr(at + 3);
    if (rest.size() >= 6 && beast::iequals(rest.substr(0, 6), "admin-")) rest.remove_prefix(6);
    std::size_t run = 0;
    while (run < rest.size() && is_alnum(rest[run])) ++run;
    if (run >= kMinRun) return true;
  }
  return false;
}

}  // namespace tollgate::gateway
