#include "gateway/gateway_metrics.hpp"

#include <catch2/catch.hpp>

using tollgate::gateway::route_label;

TEST_CASE("route_label names the gateway's routes and folds everything else", "[gateway][metrics]") {
  for (std::string_view route :
       {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz", "/metrics"}) {
    CHECK(route_label(route) == route);
  }
  CHECK(route_label("/admin/keys") == "/admin");
  CHECK(route_label("/v1/embeddings/x") == "other");
  CHECK(route_label("/anything") == "other");
}
