// Server-sent events (the WHATWG event-stream format) as the OpenAI streaming
// API sends them: pure, so it is tested and fuzzed without sockets.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate::backends {

// Caps on one event stream, so that a broken or hostile upstream costs bounded
// memory. A streamed chunk is small, but one holding a whole image, a long tool
// call or many logprobs can reach megabytes.
inline constexpr std::size_t kMaxSseLine = 4 * 1024 * 1024;   // one line of the event stream
inline constexpr std::size_t kMaxSseEvent = 4 * 1024 * 1024;  // one event's data, its lines joined

// Splits a server-sent event stream fed in arbitrary pieces into the data of
// each event (multi-line data joined by '\n'; comments and other fields
// skipped). A line or an event past its cap stops the decoder: it returns the
// events before it, and nothing after.
class SseDecoder {
 public:
  explicit SseDecoder(std::size_t max_line = kMaxSseLine, std::size_t max_event = kMaxSseEvent)
      : max_line_(max_line), max_event_(max_event) {}
  std::vector<std::string> feed(std::string_view bytes);
  bool overflowed() const { return overflowed_; }

 private:
  std::size_t max_line_;
  std::size_t max_event_;
  std::string line_;
  std::string data_;
  bool has_data_ = false;
  bool overflowed_ = false;
};

}  // namespace tollgate::backends
