#include "gateway/routes.hpp"

#include <catch2/catch.hpp>
#include <set>
#include <string>

using namespace tollgate::gateway;

TEST_CASE("route_label names the gateway's routes and folds everything else", "[gateway][routes]") {
  for (std::string_view route :
       {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz", "/metrics"}) {
    CHECK(route_label(route) == route);
  }
  CHECK(route_label("/admin/keys") == "/admin");
  CHECK(route_label("/admin") == "/admin");
  CHECK(route_label("/v1/embeddings/x") == "other");
  CHECK(route_label("/anything") == "other");
}

TEST_CASE("find_route matches exact paths, and prefixes only at a segment boundary", "[gateway][routes]") {
  REQUIRE(find_route("/v1/chat/completions") != nullptr);
  CHECK(find_route("/v1/chat/completions")->handler == RouteHandler::chat_completions);
  CHECK(find_route("/v1/embeddings")->handler == RouteHandler::embeddings);
  CHECK(find_route("/admin/users/alice")->handler == RouteHandler::admin);
  // Everything else is the app's, when there is one.
  for (std::string_view path : {"/", "", "/v1/chat/completions/", "/v1/chat/completionsx", "/adminx", "/administrator",
                                "/v1", "/v1/", "/metrics/x", "/healthz/", "/V1/models"}) {
    CAPTURE(std::string(path));
    CHECK(find_route(path) == nullptr);
  }
}

TEST_CASE("every gateway route says who may call it and how", "[gateway][routes]") {
  std::set<std::string_view> paths, labels;
  for (const auto& route : gateway_routes()) {
    CAPTURE(std::string(route.path));
    CHECK(paths.insert(route.path).second);
    CHECK(labels.insert(route.label).second);
    CHECK(find_route(route.path) == &route);
    CHECK(route.label != "other");
    CHECK(route.label != "app");
  }
  // Completions and the model list need a user's key; the admin API its own; health and metrics none.
  CHECK(find_route("/v1/completions")->auth == RouteAuth::key);
  CHECK(find_route("/v1/completions")->methods == kPost);
  CHECK(find_route("/v1/models")->auth == RouteAuth::key);
  CHECK(find_route("/v1/models")->methods == (kGet | kHead));
  CHECK(find_route("/admin/keys")->auth == RouteAuth::admin);
  CHECK(find_route("/metrics")->auth == RouteAuth::none);
  CHECK(allowed_methods_text(kGet) == "GET");
  CHECK(allowed_methods_text(kPost) == "POST");
  CHECK(allowed_methods_text(kGet | kHead) == "GET");
  CHECK(allow_header(kGet | kHead) == "GET, HEAD");
  CHECK(allow_header(kPost) == "POST");
  CHECK(allow_header(kGet | kPost) == "GET, POST");
}
