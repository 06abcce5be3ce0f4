// The gateway's configuration (gateway/config.hpp parse_config) from YAML
// text: a file that is not a valid configuration is a ConfigError naming
// what is wrong, never another exception or a crash.
#include <cstdint>
#include <string>

#include "gateway/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    tollgate::gateway::parse_config(text, "fuzz.yaml");
  } catch (const tollgate::gateway::ConfigError&) {
    // Refused with a message: what a bad file should get.
  }
  return 0;
}
