// Server-sent events (the WHATWG event-stream format) as the OpenAI streaming
// API sends them: pure, so it is tested and fuzzed without sockets.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace tollgate::backends {

// Splits a server-sent event stream fed in arbitrary pieces into the data of
// each event (multi-line data joined by '\n'; comments and other fields skipped).
class SseDecoder {
 public:
  std::vector<std::string> feed(std::string_view bytes);

 private:
  std::string line_;
  std::string data_;
  bool has_data_ = false;
};

}  // namespace tollgate::backends
