// A deterministic backend that answers with the caller's own words: for
// trying the gateway without a model, and for measuring the gateway alone.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "backends/backend.hpp"
#include "backends/backend_factory.hpp"

namespace tollgate::backends {

struct EchoConfig {
  std::string name = "echo";
  // Delay before each token; zero answers at once, on the caller's thread.
  std::chrono::milliseconds token_delay{0};
};

// Tokens are whitespace-separated words. The reply repeats the last user
// message (chat) or the prompt, truncated at max_tokens (finish "length") and
// at the first stop sequence (finish "stop").
std::unique_ptr<Backend> make_echo_backend(const EchoConfig& config);

// `type: echo`: reads `token_delay` into an EchoConfig.
BackendType echo_backend_type();

// The echo tokenisation, shared with tests.
std::vector<std::string> echo_tokens(const std::string& text);

}  // namespace tollgate::backends
