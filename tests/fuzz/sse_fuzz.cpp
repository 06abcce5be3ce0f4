// The OpenAI backend's server-sent event decoder (backends/sse_parser.hpp) on
// an upstream stream, fed whole and in pieces: the events may not depend on
// how the bytes were split across reads. Input: one byte choosing the piece
// sizes, then the stream.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "backends/sse_parser.hpp"

using tollgate::backends::SseDecoder;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t sizes[2] = {1u + (data[0] & 0x0fu), 1u + (data[0] >> 4) * 11u};
  const std::string_view stream(reinterpret_cast<const char*>(data) + 1, size - 1);

  SseDecoder whole;
  const std::vector<std::string> expected = whole.feed(stream);

  SseDecoder pieces;
  std::vector<std::string> events;
  std::string_view rest = stream;
  for (std::size_t turn = 0; !rest.empty(); ++turn) {
    std::size_t n = std::min(sizes[turn % 2], rest.size());
    for (auto& e : pieces.feed(rest.substr(0, n))) events.push_back(std::move(e));
    rest.remove_prefix(n);
  }
  if (events != expected) std::abort();

  // An event's data is built from the stream's own bytes, minus field names.
  std::size_t total = 0;
  for (const auto& e : expected) total += e.size();
  if (total > stream.size()) std::abort();
  return 0;
}
