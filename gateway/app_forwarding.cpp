#include "gateway/app_forwarding.hpp"

#include <boost/beast/core/string.hpp>
#include <string>

namespace tollgate::gateway {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;

void set_forwarded_headers(const http::request_header<>& req, std::string_view peer, bool trusted,
                           proxy::AppForward& how) {
  std::string forwarded_for;
  if (trusted) {
    // Every X-Forwarded-For line, in order: several are one comma-separated list.
    for (const auto& f : req) {
      if (!beast::iequals(f.name_string(), "X-Forwarded-For") || how.drop_request.contains(f.name_string())) continue;
      if (!forwarded_for.empty()) forwarded_for += ", ";
      forwarded_for += f.value();
    }
  } else {
    for (std::string_view name :
         {"X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Real-IP", "Forwarded"}) {
      how.drop_request.add(name);
    }
  }
  if (!forwarded_for.empty()) forwarded_for += ", ";
  forwarded_for += peer;
  how.set_request_header("X-Forwarded-For", forwarded_for);
  // Tollgate itself speaks plain HTTP; TLS ends at a proxy in front, which says so.
  if (!trusted || req["X-Forwarded-Proto"].empty()) how.set_request_header("X-Forwarded-Proto", "http");
  if ((!trusted || req["X-Forwarded-Host"].empty()) && !req[http::field::host].empty()) {
    how.set_request_header("X-Forwarded-Host", req[http::field::host]);
  }
}

// Whether `name` spells, with an underscore for a hyphen, a header the
// gateway vouches for: CGI, WSGI, Rack and PHP read X_Tollgate_User and
// X-Tollgate-User as one (HTTP_X_TOLLGATE_USER), so either could win there.
bool vouched_alias(std::string_view name) {
  if (name.find('_') == std::string_view::npos) return false;
  std::string hyphenated(name);
  for (char& c : hyphenated) {
    if (c == '_') c = '-';
  }
  if (beast::iequals(std::string_view(hyphenated).substr(0, 11), "X-Tollgate-")) return true;
  if (beast::iequals(std::string_view(hyphenated).substr(0, 12), "X-Forwarded-")) return true;
  return beast::iequals(hyphenated, "X-Real-IP");
}

}  // namespace

std::optional<HeadViolation> plan_app_request(const http::request_header<>& req, const std::optional<AppCaller>& caller,
                                              std::string_view peer, bool trusted_peer, proxy::AppForward& how) {
  if (caller) {
    how.set_request_header("X-Tollgate-User", caller->user);
    how.set_request_header("X-Tollgate-Key-Id", caller->key_prefix);
  } else {
    // Only Tollgate vouches for who the caller is.
    how.drop_request.add("X-Tollgate-User");
    how.drop_request.add("X-Tollgate-Key-Id");
  }
  // The app never sees a Tollgate key: every header holding the key this
  // request used, or anything shaped like one, goes whole (a cookie too).
  std::string_view used = caller ? caller->presented_key : std::string_view{};
  for (const auto& f : req) {
    auto value = f.value();
    if (vouched_alias(f.name_string())) {
      auto name = f.name_string();
      how.drop_request.add({name.data(), name.size()});
      continue;
    }
    if (!holds_tollgate_key({value.data(), value.size()}, used)) continue;
    if (f.name() == http::field::host) return HeadViolation{400, "a key in the Host header", "bad_http"};
    auto name = f.name_string();
    how.drop_request.add({name.data(), name.size()});
  }
  how.target = origin_form(req.target());
  set_forwarded_headers(req, peer, trusted_peer, how);
  return std::nullopt;
}

}  // namespace tollgate::gateway
