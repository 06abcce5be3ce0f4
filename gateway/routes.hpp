// The gateway's own routes, listed once: dispatch, app-proxy ownership and
// metric labels all read this table.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace tollgate::gateway {

// Who may call a route.
enum class RouteAuth {
  none,   // anyone: health checks and metrics
  key,    // a user's API key, checked before the body is read
  admin,  // the admin key
};

// What answers a route; the session maps each to its handler.
enum class RouteHandler {
  chat_completions,
  completions,
  embeddings,
  models,
  health,
  readiness,
  metrics,
  admin,
  jobs,  // /v2/{endpoint}/...: only while job endpoints are configured
};

// HTTP methods a route accepts, as a bit set. kHead: HEAD is GET without the
// body (the read-only routes, which load balancers probe with it).
enum Method : std::uint8_t { kGet = 1, kPost = 2, kHead = 4, kAnyMethod = 0xff };

struct Route {
  std::string_view path;
  bool prefix = false;  // also matches path + "/..."
  std::uint8_t methods = kAnyMethod;
  RouteAuth auth = RouteAuth::none;
  std::string_view label;  // the metrics label and usage row's route
  RouteHandler handler;
};

// Every route the gateway answers itself, in the order they are matched.
std::span<const Route> gateway_routes();

// The route serving `path`, or nullptr: with an app upstream, that path goes to the app.
const Route* find_route(std::string_view path);

// The route label: known routes by name, everything else folded so a client
// cannot create unbounded series.
std::string_view route_label(std::string_view path);

// "GET", "POST", "GET or POST": what a 405 tells the client to use.
std::string_view allowed_methods_text(std::uint8_t methods);
// The 405's Allow header: "GET, HEAD", "POST", "GET, POST" ...
std::string allow_header(std::uint8_t methods);

}  // namespace tollgate::gateway
