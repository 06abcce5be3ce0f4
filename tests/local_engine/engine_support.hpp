// Helpers the engine tests share: a request's event collector and a
// temporary model file.
#pragma once

#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "local_engine/engine.hpp"

namespace tollgate::test {

// Collects one request's events and waits (bounded) for its end.
struct Collector {
  std::mutex mutex;
  std::condition_variable cv;
  std::string text;
  std::vector<std::string> pieces;
  std::vector<local_engine::TokenLogprobs> logprobs;
  std::optional<local_engine::GenerationEvent> last;

  local_engine::GenerationCallback callback() {
    return [this](local_engine::GenerationEvent e) {
      std::lock_guard lock(mutex);
      if (e.type == local_engine::GenerationEvent::Type::text) {
        text += e.text;
        pieces.push_back(e.text);
        logprobs.insert(logprobs.end(), e.logprobs.begin(), e.logprobs.end());
        return;
      }
      REQUIRE_FALSE(last.has_value());  // exactly one final event
      last = std::move(e);
      cv.notify_all();
    };
  }
  const local_engine::GenerationEvent& wait(std::chrono::seconds timeout = std::chrono::seconds(60)) {
    std::unique_lock lock(mutex);
    REQUIRE(cv.wait_for(lock, timeout, [&] { return last.has_value(); }));
    return *last;
  }
};

// A file in the temporary directory, named after the process, removed at the end.
class TempFile {
 public:
  explicit TempFile(const std::string& name)
      : path_((std::filesystem::temp_directory_path() / (std::to_string(::getpid()) + "-" + name)).string()) {}
  ~TempFile() { std::filesystem::remove(path_); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace tollgate::test
