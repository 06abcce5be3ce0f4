#include "backends/router.hpp"

#include <algorithm>
#include <random>
#include <stdexcept>

namespace tollgate::backends {
namespace {

std::int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Orders `candidates` by weighted sampling without replacement: each pick is
// proportional to the weights left, so traffic splits by weight and every
// deployment still appears as a fallback.
void weighted_order(std::vector<const Deployment*>& candidates) {
  thread_local std::minstd_rand rng{std::random_device{}()};
  for (std::size_t i = 0; i + 1 < candidates.size(); ++i) {
    std::uint64_t total = 0;
    for (std::size_t j = i; j < candidates.size(); ++j) total += candidates[j]->weight;
    std::uint64_t pick = std::uniform_int_distribution<std::uint64_t>(0, total - 1)(rng);
    std::size_t chosen = i;
    for (std::size_t j = i; j < candidates.size(); ++j) {
      if (pick < candidates[j]->weight) {
        chosen = j;
        break;
      }
      pick -= candidates[j]->weight;
    }
    std::swap(candidates[i], candidates[chosen]);
  }
}

}  // namespace

void Router::add_backend(std::unique_ptr<Backend> backend) {
  if (this->backend(backend->name())) {
    throw std::invalid_argument("backend '" + backend->name() + "' is defined twice");
  }
  backends_.push_back(std::move(backend));
}

Backend* Router::backend(const std::string& name) const {
  for (const auto& b : backends_) {
    if (b->name() == name) return b.get();
  }
  return nullptr;
}

void Router::add_route(Route route) {
  if (index_.contains(route.model)) {
    throw std::invalid_argument("model '" + route.model + "' is defined twice");
  }
  if (route.deployments.empty()) {
    throw std::invalid_argument("model '" + route.model + "' has no deployments");
  }
  for (const auto& d : route.deployments) {
    if (!d.backend) throw std::invalid_argument("model '" + route.model + "' names an unknown backend");
    if (d.weight == 0) throw std::invalid_argument("model '" + route.model + "' has a deployment of weight 0");
  }
  index_.emplace(route.model, routes_.size());
  routes_.push_back(std::move(route));
}

std::vector<const Deployment*> Router::plan(const std::string& model) const {
  auto it = index_.find(model);
  if (it == index_.end()) return {};
  const Route& route = routes_[it->second];
  const std::int64_t now = steady_ms();
  std::vector<const Deployment*> healthy, cooling;
  for (const auto& d : route.deployments) {
    (d.health->cooldown_until_ms.load() > now ? cooling : healthy).push_back(&d);
  }
  if (route.strategy == RoutingStrategy::least_busy) {
    std::stable_sort(healthy.begin(), healthy.end(), [](const Deployment* a, const Deployment* b) {
      return a->health->in_flight.load() < b->health->in_flight.load();
    });
  } else {
    weighted_order(healthy);
  }
  // The one whose cooldown ends first is the likeliest to have recovered.
  std::sort(cooling.begin(), cooling.end(), [](const Deployment* a, const Deployment* b) {
    return a->health->cooldown_until_ms.load() < b->health->cooldown_until_ms.load();
  });
  healthy.insert(healthy.end(), cooling.begin(), cooling.end());
  return healthy;
}

void Router::record_success(const Deployment& deployment) const { deployment.health->consecutive_failures.store(0); }

void Router::record_failure(const Deployment& deployment) const {
  if (deployment.health->consecutive_failures.fetch_add(1) + 1 >= policy_.failures_to_cool) {
    deployment.health->consecutive_failures.store(0);
    deployment.health->cooldown_until_ms.store(steady_ms() + policy_.cooldown.count());
  }
}

}  // namespace tollgate::backends
