// The HTTP server: one io_context and one SO_REUSEPORT acceptor per thread,
// one coroutine per connection.
#pragma once

#include "gateway/config.hpp"

namespace tollgate::gateway {

// Serves until SIGTERM or SIGINT, then drains in-flight requests (within
// limits.shutdown_grace), flushes metering and returns the exit code.
int run_server(const Config& config);

}  // namespace tollgate::gateway
