// The HTTP/1.1 rules a request must pass before anything acts on it (RFC 9112
// framing, Host, header syntax), and the security rules of the app proxy
// (public paths, where a Tollgate key hides). Pure functions over a parsed
// header: tested and fuzzed without sockets.
#pragma once

#include <boost/beast/http/message.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate::gateway {

// Why a request head is refused: the status, and an OpenAI-style message and code.
struct HeadViolation {
  int status = 400;
  std::string message;
  std::string code = "bad_http";
};

// Checks what Beast's parser leaves to the application:
// - HTTP/1.0 or HTTP/1.1 only (505 otherwise);
// - Transfer-Encoding: only "chunked", once, and not in HTTP/1.0 (a final
//   coding other than chunked leaves the body unframed: 400; codings before
//   chunked are not implemented: 501), so a body can never be read as the
//   next request;
// - exactly one Host in HTTP/1.1, at most one in HTTP/1.0, holding only
//   authority characters;
// - the target in origin form ("/..."), asterisk form for OPTIONS, or
//   absolute form with an http(s) scheme whose authority agrees with Host;
//   no CONNECT (405), no fragment;
// - no control characters in any field value, no empty field name;
// - at most one Authorization and one x-api-key, so which one authenticates
//   is never a guess;
// - Expect: only 100-continue (417).
// Content-Length lists and repeats Beast has already reduced to one value
// (all equal, or the request failed to parse); forwarding writes that value.
std::optional<HeadViolation> check_request_head(const boost::beast::http::request_header<>& req);

// The path of a target: origin form as it is, absolute form without its
// scheme and authority, and without the query in both cases.
std::string_view target_path(std::string_view target);
// The target as the app receives it: origin form (absolute form rewritten).
std::string_view origin_form(std::string_view target);

// Public paths match literally (or by prefix when the pattern ends in '*').
// A path the app could normalise into another one (dot segments, percent
// escapes, ';' parameters, backslashes, empty segments) never matches, so
// "/public/../private" or "/public/..;/private" cannot skip authentication.
bool is_public_path(const std::vector<std::string>& patterns, std::string_view path);

// True when `value` holds something shaped like a Tollgate key ("tg-" and at
// least 16 base62 characters, "tg-admin-..." included), or `presented` (the
// key this request authenticated with, whatever its shape).
bool holds_tollgate_key(std::string_view value, std::string_view presented = {});

}  // namespace tollgate::gateway
