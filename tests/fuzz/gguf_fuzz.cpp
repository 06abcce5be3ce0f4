// The GGUF reader (local_engine/gguf.hpp) on an untrusted model file, then the
// vocabulary and tokenizer built from it (local_engine/model.hpp
// load_vocabulary). A bad file is a ModelError (or the tokenizer's
// invalid_argument), never a crash or a read outside the file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "local_engine/gguf.hpp"
#include "local_engine/model.hpp"
#include "local_engine/tokenizer.hpp"

namespace {

namespace engine = tollgate::local_engine;

// The reader maps a path: one in-memory file, rewritten for every input.
const std::string& memory_file(const std::uint8_t* data, std::size_t size) {
  static const int fd = memfd_create("gguf_fuzz", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ftruncate(fd, 0) != 0) std::abort();
  for (std::size_t at = 0; at < size;) {
    auto n = pwrite(fd, data + at, size - at, static_cast<off_t>(at));
    if (n <= 0) std::abort();
    at += static_cast<std::size_t>(n);
  }
  return path;
}

void check_file(const engine::gguf::File& file) {
  const auto& mapping = *file.mapping();
  const std::byte* begin = mapping.data();
  const std::byte* end = begin + mapping.size();
  // Without tensors the (aligned) data section may start past a short file's end.
  if (!file.tensors().empty() && file.data_offset() > mapping.size()) std::abort();
  for (const auto& t : file.tensors()) {
    if (t.data < begin + file.data_offset() || t.bytes > static_cast<std::size_t>(end - t.data)) std::abort();
    if (t.elements() <= 0) std::abort();
    if (file.find_tensor(t.name) == nullptr) std::abort();
  }
  for (const auto& m : file.metadata()) {
    if (file.find(m.key) == nullptr) std::abort();
    m.value.as_integer();
    m.value.as_real();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = memory_file(data, size);
  try {
    engine::gguf::File file(path);
    check_file(file);
  } catch (const engine::ModelError&) {
    return 0;  // refused, with a message naming where
  }
  try {
    engine::Tokenizer tokenizer(engine::load_vocabulary(path));
    auto ids = tokenizer.encode("Hello, world! <s> 你好 🙂", true, true);
    tokenizer.decode(ids);
  } catch (const engine::ModelError&) {
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
