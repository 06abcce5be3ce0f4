// The kernel table on a real GPU: without a usable device the whole binary
// exits 77, which ctest reports as skipped (never as passed).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <iostream>
#include <string>

#include "kernels/runtime.hpp"

int main(int argc, char** argv) {
  std::string why;
  if (!tollgate::kernels::cuda::device_available(why)) {
    std::cout << "skipped: " << why << "\n";
    return 77;
  }
  std::cout << "running on " << tollgate::kernels::cuda::device_name() << "\n";
  return Catch::Session().run(argc, argv);
}
