// Backend types by name, after Envoy's factory per extension: each type reads
// its own `backends[i]` section into its own config (unknown keys are errors)
// and builds its Backend from it at start. Nothing outside a type knows its keys.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "backends/backend.hpp"

namespace YAML {
class Node;
}

namespace tollgate::metering {
class Registry;
}

namespace tollgate::backends {

class ConfigReader;
template <class Config>
class BackendSpecOf;

// What building a backend may use from the process.
struct BackendContext {
  metering::Registry& metrics;
};

// One backend's section, parsed and validated by its type.
class BackendSpec {
 public:
  virtual ~BackendSpec() = default;
  // Throws ConfigError for what shows only when building (a model file it cannot serve).
  virtual std::unique_ptr<Backend> make(const BackendContext& context) const = 0;

  // The type's own config (EchoConfig, OpenAICompatibleConfig, LocalBackendConfig, RunpodConfig),
  // or null when the spec is another type's.
  template <class Config>
  const Config* as() const {
    const auto* typed = dynamic_cast<const BackendSpecOf<Config>*>(this);
    return typed ? &typed->config() : nullptr;
  }
};

// The spec of a type whose section reads into a `Config`.
template <class Config>
class BackendSpecOf final : public BackendSpec {
 public:
  using Make = std::unique_ptr<Backend> (*)(const Config&, const BackendContext&);
  BackendSpecOf(Config config, Make make) : config_(std::move(config)), make_(make) {}

  const Config& config() const { return config_; }
  std::unique_ptr<Backend> make(const BackendContext& context) const override { return make_(config_, context); }

 private:
  Config config_;
  Make make_;
};

// One backend type, registered under the name a section's `type` gives.
struct BackendType {
  // Reads `section` (a mapping; `name` and `type` already read from it) at
  // `path` ("backends[1]"), rejecting keys the type does not know.
  using Parse = std::shared_ptr<const BackendSpec> (*)(const ConfigReader& reader, const YAML::Node& section,
                                                       const std::string& path, const std::string& name);
  std::string name;
  Parse parse = nullptr;
};

// The types a configuration may name, in the order they were given.
class BackendTypes {
 public:
  explicit BackendTypes(std::vector<BackendType> types) : types_(std::move(types)) {}

  const BackendType* find(std::string_view name) const;
  std::string names() const;  // "echo, openai, local, runpod", for messages

 private:
  std::vector<BackendType> types_;
};

// echo, openai, local and runpod.
const BackendTypes& builtin_backend_types();

}  // namespace tollgate::backends
