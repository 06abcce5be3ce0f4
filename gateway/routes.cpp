#include "gateway/routes.hpp"

#include <array>
#include <utility>

namespace tollgate::gateway {
namespace {

constexpr std::array kRoutes{
    Route{"/v1/chat/completions", false, kPost, RouteAuth::key, "/v1/chat/completions", RouteHandler::chat_completions},
    Route{"/v1/completions", false, kPost, RouteAuth::key, "/v1/completions", RouteHandler::completions},
    Route{"/v1/embeddings", false, kPost, RouteAuth::key, "/v1/embeddings", RouteHandler::embeddings},
    // The list, and /v1/models/{id} (an id may hold slashes: org/name).
    Route{"/v1/models", true, kGet | kHead, RouteAuth::key, "/v1/models", RouteHandler::models},
    Route{"/healthz", false, kGet | kHead, RouteAuth::none, "/healthz", RouteHandler::health},
    Route{"/readyz", false, kGet | kHead, RouteAuth::none, "/readyz", RouteHandler::readiness},
    Route{"/metrics", false, kGet | kHead, RouteAuth::none, "/metrics", RouteHandler::metrics},
    // The job API checks its own methods per operation.
    Route{"/v2", true, kGet | kPost, RouteAuth::key, "/v2", RouteHandler::jobs},
    // The admin API checks its own methods per resource.
    Route{"/admin", true, kAnyMethod, RouteAuth::admin, "/admin", RouteHandler::admin},
};

bool matches(const Route& route, std::string_view path) {
  if (path == route.path) return true;
  return route.prefix && path.size() > route.path.size() && path.starts_with(route.path) &&
         path[route.path.size()] == '/';
}

}  // namespace

std::span<const Route> gateway_routes() { return kRoutes; }

const Route* find_route(std::string_view path) {
  for (const auto& route : kRoutes) {
    if (matches(route, path)) return &route;
  }
  return nullptr;
}

std::string_view route_label(std::string_view path) {
  const Route* route = find_route(path);
  return route ? route->label : "other";
}

std::string_view allowed_methods_text(std::uint8_t methods) {
  switch (methods & ~kHead) {
    case kGet:
      return "GET";
    case kPost:
      return "POST";
    case kGet | kPost:
      return "GET or POST";
    default:
      return "another method";
  }
}

std::string allow_header(std::uint8_t methods) {
  std::string allow;
  for (auto [bit, name] : {std::pair{kGet, "GET"}, std::pair{kHead, "HEAD"}, std::pair{kPost, "POST"}}) {
    if (methods & bit) allow += (allow.empty() ? "" : ", ") + std::string(name);
  }
  return allow;
}

}  // namespace tollgate::gateway
