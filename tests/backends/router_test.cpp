#include <catch2/catch.hpp>

#include <map>
#include <set>
#include <thread>

#include "backends/echo.hpp"
#include "backends/router.hpp"

using namespace tollgate::backends;

namespace {

Router router_with(std::vector<std::pair<std::string, std::uint32_t>> deployments, RoutingStrategy strategy,
                   HealthPolicy policy = {}) {
  Router router(policy);
  Route route{"m", {}, strategy};
  for (const auto& [name, weight] : deployments) {
    router.add_backend(make_echo_backend({name, {}}));
    Deployment d;
    d.backend = router.backend(name);
    d.upstream_model = name;
    d.weight = weight;
    route.deployments.push_back(d);
  }
  router.add_route(std::move(route));
  return router;
}

}  // namespace

TEST_CASE("a plan holds every deployment once and nothing for unknown models", "[backends][router]") {
  auto router = router_with({{"a", 1}, {"b", 1}, {"c", 1}}, RoutingStrategy::weighted);
  CHECK(router.plan("other").empty());
  for (int i = 0; i < 50; ++i) {
    auto plan = router.plan("m");
    REQUIRE(plan.size() == 3);
    std::set<std::string> names;
    for (const auto* d : plan) names.insert(d->backend->name());
    CHECK(names.size() == 3);
  }
}

TEST_CASE("weights decide how often a deployment comes first", "[backends][router]") {
  auto router = router_with({{"heavy", 9}, {"light", 1}}, RoutingStrategy::weighted);
  std::map<std::string, int> first;
  constexpr int kPlans = 10'000;
  for (int i = 0; i < kPlans; ++i) ++first[router.plan("m").front()->backend->name()];
  // Expected 9,000 (sd 30): bounds ten deviations wide.
  CHECK(first["heavy"] > 8'700);
  CHECK(first["heavy"] < 9'300);
}

TEST_CASE("least_busy puts the deployment with fewest requests in flight first", "[backends][router]") {
  auto router = router_with({{"a", 1}, {"b", 1}}, RoutingStrategy::least_busy);
  auto plan = router.plan("m");
  CHECK(plan.front()->backend->name() == "a");  // a tie keeps the configured order
  InFlight busy(*plan.front());
  CHECK(router.plan("m").front()->backend->name() == "b");
}

TEST_CASE("consecutive failures cool a deployment down to the end of the plan", "[backends][router]") {
  auto router = router_with({{"flaky", 1}, {"steady", 1}}, RoutingStrategy::least_busy,
                            {2, std::chrono::milliseconds(200)});
  const Deployment& flaky = *router.plan("m").front();
  REQUIRE(flaky.backend->name() == "flaky");

  router.record_failure(flaky);
  router.record_success(flaky);  // a success in between resets the count
  router.record_failure(flaky);
  CHECK(router.plan("m").front()->backend->name() == "flaky");

  router.record_failure(flaky);
  auto plan = router.plan("m");
  CHECK(plan.front()->backend->name() == "steady");
  CHECK(plan.back()->backend->name() == "flaky");  // still a last resort

  // Bounded wait for the cooldown to end.
  for (int i = 0; i < 100 && router.plan("m").front()->backend->name() != "flaky"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(router.plan("m").front()->backend->name() == "flaky");
}
