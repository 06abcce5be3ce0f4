#include "backends/backend_factory.hpp"

#include "backends/echo.hpp"
#include "backends/local.hpp"
#include "backends/openai_compatible.hpp"
#include "backends/runpod.hpp"

namespace tollgate::backends {

const BackendType* BackendTypes::find(std::string_view name) const {
  for (const auto& type : types_) {
    if (type.name == name) return &type;
  }
  return nullptr;
}

std::string BackendTypes::names() const {
  std::string out;
  for (const auto& type : types_) out += (out.empty() ? "" : ", ") + type.name;
  return out;
}

const BackendTypes& builtin_backend_types() {
  static const BackendTypes types(
      {echo_backend_type(), openai_backend_type(), local_backend_type(), runpod_backend_type()});
  return types;
}

}  // namespace tollgate::backends
