#include "backends/sse_parser.hpp"

#include <utility>

namespace tollgate::backends {

std::vector<std::string> SseDecoder::feed(std::string_view bytes) {
  std::vector<std::string> events;
  for (char c : bytes) {
    if (c != '\n') {
      line_ += c;
      continue;
    }
    if (!line_.empty() && line_.back() == '\r') line_.pop_back();
    if (line_.empty()) {
      if (has_data_) events.push_back(std::exchange(data_, {}));
      has_data_ = false;
    } else if (line_.front() != ':') {  // a comment (keep-alive) otherwise
      auto colon = line_.find(':');
      std::string_view field(line_.data(), colon == std::string::npos ? line_.size() : colon);
      if (field == "data") {
        std::string_view value;
        if (colon != std::string::npos) {
          value = std::string_view(line_).substr(colon + 1);
          if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
        }
        if (has_data_) data_ += '\n';
        data_ += value;
        has_data_ = true;
      }
    }
    line_.clear();
  }
  return events;
}

}  // namespace tollgate::backends
