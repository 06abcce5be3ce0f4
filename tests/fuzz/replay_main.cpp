// Runs every file of the directories (or the files) named on the command line
// through LLVMFuzzerTestOneInput once: the committed corpora and regression
// inputs of a fuzz target, replayed by ctest with the ordinary compiler.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

namespace fs = std::filesystem;

std::vector<fs::path> inputs_in(const fs::path& where) {
  std::vector<fs::path> files;
  if (fs::is_directory(where)) {
    for (const auto& entry : fs::recursive_directory_iterator(where)) {
      if (entry.is_regular_file()) files.push_back(entry.path());
    }
  } else if (fs::exists(where)) {
    files.push_back(where);
  }
  std::sort(files.begin(), files.end());  // a failure names the same input every run
  return files;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t replayed = 0;
  for (int i = 1; i < argc; ++i) {
    for (const auto& path : inputs_in(argv[i])) {
      std::ifstream file(path, std::ios::binary);
      if (!file) {
        std::fprintf(stderr, "replay: cannot read %s\n", path.c_str());
        return 1;
      }
      const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
      // Printed first: an input that crashes is the last name in the log.
      std::fprintf(stderr, "replay: %s\n", path.c_str());
      // libFuzzer never passes a null pointer, even for an empty input.
      static const std::uint8_t kEmpty = 0;
      const auto* data = bytes.empty() ? &kEmpty : reinterpret_cast<const std::uint8_t*>(bytes.data());
      LLVMFuzzerTestOneInput(data, bytes.size());
      ++replayed;
    }
  }
  std::fprintf(stderr, "replay: %zu inputs\n", replayed);
  // A target with no inputs at all is a wiring mistake, not a pass.
  return replayed > 0 ? 0 : 1;
}
