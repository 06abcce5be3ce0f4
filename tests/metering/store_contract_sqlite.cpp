// The store contract on SQLite: each database a new temporary file.
#include <atomic>
#include <filesystem>
#include <random>

#include <unistd.h>

#include "tests/metering/store_contract.hpp"

namespace tollgate::metering::test {

ContractDatabase::ContractDatabase() {
  static std::atomic<int> counter{0};
  std::random_device random;
  location_ = (std::filesystem::temp_directory_path() /
               ("tollgate-contract-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" +
                std::to_string(random()) + ".db"))
                  .string();
}

ContractDatabase::~ContractDatabase() {
  std::error_code ignored;
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) std::filesystem::remove(location_ + suffix, ignored);
}

}  // namespace tollgate::metering::test
