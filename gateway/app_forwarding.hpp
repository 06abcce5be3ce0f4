// What the app receives of a proxied request, decided without sockets: who
// the caller is, which client headers it never sees, and X-Forwarded-*.
#pragma once

#include <boost/beast/http/message.hpp>
#include <optional>
#include <string_view>

#include "gateway/http_rules.hpp"
#include "gateway/proxy/app_upstream.hpp"

namespace tollgate::gateway {

// The authenticated caller of a keyed path; absent on a public path.
struct AppCaller {
  std::string_view user;
  std::string_view key_prefix;
  std::string_view presented_key;  // the key the request authenticated with
};

// Fills `how`'s request side:
// - X-Tollgate-User and X-Tollgate-Key-Id come only from `caller`; a client's are dropped;
// - every header holding the caller's key, or anything shaped like a Tollgate
//   key, is dropped whole (a Cookie too); a key in Host refuses the request;
// - X-Forwarded-For gets `peer` appended when the peer is a trusted proxy and
//   is replaced otherwise, as are X-Forwarded-Proto and -Host; from an
//   untrusted peer X-Forwarded-Port, X-Real-IP and Forwarded are dropped;
// - the target in origin form.
// `how` keeps views into `req`: it must not outlive it.
std::optional<HeadViolation> plan_app_request(const boost::beast::http::request_header<>& req,
                                              const std::optional<AppCaller>& caller, std::string_view peer,
                                              bool trusted_peer, proxy::AppForward& how);

}  // namespace tollgate::gateway
