// A unique SQLite file path under the system temp directory, removed (with its
// WAL and shared-memory files) when the test ends.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <string>

namespace tollgate::metering::test {

class TempDatabase {
 public:
  TempDatabase() {
    static std::atomic<int> counter{0};
    std::random_device random;
    path_ = (std::filesystem::temp_directory_path() /
             ("tollgate-metering-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) +
              "-" + std::to_string(random()) + ".db"))
                .string();
  }
  ~TempDatabase() {
    std::error_code ignored;
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) {
      std::filesystem::remove(path_ + suffix, ignored);
    }
  }
  TempDatabase(const TempDatabase&) = delete;
  TempDatabase& operator=(const TempDatabase&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace tollgate::metering::test
