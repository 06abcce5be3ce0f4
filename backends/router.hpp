// The routing table: public model name -> the deployments that serve it, the
// order to try them in for one request, and their passive health.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backends/backend.hpp"

namespace tollgate::backends {

// What a deployment has shown lately; shared by every request, so atomic.
struct DeploymentHealth {
  std::atomic<int> consecutive_failures{0};
  std::atomic<std::int64_t> cooldown_until_ms{0};  // steady clock; 0: never cooled
  std::atomic<int> in_flight{0};
};

struct Deployment {
  Backend* backend = nullptr;  // owned by the Router
  std::string upstream_model;  // the backend's name for the model
  std::uint32_t weight = 1;
  std::shared_ptr<DeploymentHealth> health = std::make_shared<DeploymentHealth>();
};

enum class RoutingStrategy { weighted, least_busy };

struct Route {
  std::string model;  // public name
  std::vector<Deployment> deployments;
  RoutingStrategy strategy = RoutingStrategy::weighted;
};

struct HealthPolicy {
  int failures_to_cool = 3;  // consecutive failures that start a cooldown
  std::chrono::milliseconds cooldown{30'000};
};

class Router {
 public:
  explicit Router(HealthPolicy policy = {}) : policy_(policy) {}

  // Takes ownership; names must be unique (std::invalid_argument otherwise).
  void add_backend(std::unique_ptr<Backend> backend);
  Backend* backend(const std::string& name) const;
  // Adds a public model; each deployment names a backend already added.
  void add_route(Route route);

  // The deployments to try for one request, in order: healthy ones first
  // (chosen by weight, or fewest requests in flight), then cooling ones as a
  // last resort. Empty when no route serves `model`.
  std::vector<const Deployment*> plan(const std::string& model) const;

  // Passive health: a failure that would make a client retry (connect error,
  // 5xx, 429, timeout) counts; enough in a row start a cooldown.
  void record_success(const Deployment& deployment) const;
  void record_failure(const Deployment& deployment) const;

  const std::vector<Route>& routes() const { return routes_; }

 private:
  HealthPolicy policy_;
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<Route> routes_;
  std::map<std::string, std::size_t, std::less<>> index_;  // model -> routes_ position
};

// Counts a request in flight on a deployment for as long as it lives.
class InFlight {
 public:
  explicit InFlight(const Deployment& d) : health_(d.health) { health_->in_flight.fetch_add(1); }
  ~InFlight() { health_->in_flight.fetch_sub(1); }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  std::shared_ptr<DeploymentHealth> health_;
};

}  // namespace tollgate::backends
