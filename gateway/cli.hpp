// The `tollgate` command line: serve, keys, users, usage.
#pragma once

namespace tollgate::gateway {

// Returns the process exit code: 0 success, 1 failure, 2 usage error.
int run_cli(int argc, char** argv);

}  // namespace tollgate::gateway
