// The routing table: public model name -> the deployments that serve it.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backends/backend.hpp"

namespace tollgate::backends {

struct Deployment {
  Backend* backend = nullptr;  // owned by the Router
  std::string upstream_model;  // the backend's name for the model
};

struct Route {
  std::string model;  // public name
  std::vector<Deployment> deployments;
};

class Router {
 public:
  // Takes ownership; names must be unique (std::invalid_argument otherwise).
  void add_backend(std::unique_ptr<Backend> backend);
  Backend* backend(const std::string& name) const;
  // Adds a public model; each deployment names a backend already added.
  void add_route(Route route);

  // The deployment to use for `model`, or nullopt when no route serves it.
  std::optional<Deployment> pick(const std::string& model) const;
  const std::vector<Route>& routes() const { return routes_; }

 private:
  std::vector<std::unique_ptr<Backend>> backends_;
  std::vector<Route> routes_;
  std::map<std::string, std::size_t, std::less<>> index_;  // model -> routes_ position
};

}  // namespace tollgate::backends
