#include "backends/router.hpp"

#include <stdexcept>

namespace tollgate::backends {

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
  index_.emplace(route.model, routes_.size());
  routes_.push_back(std::move(route));
}

std::optional<Deployment> Router::pick(const std::string& model) const {
  auto it = index_.find(model);
  if (it == index_.end()) return std::nullopt;
  // Fallback across deployments comes with the remote backends; until then the
  // first deployment serves.
  return routes_[it->second].deployments.front();
}

}  // namespace tollgate::backends
