#include "backends/sse_parser.hpp"

#include <utility>

namespace tollgate::backends {

std::vector<std::string> SseDecoder::feed(std::string_view bytes) {
  std::vector<std::string> events;
  if (overflowed_) return events;
  while (!bytes.empty()) {
    auto eol = bytes.find('\n');
    line_.append(bytes.substr(0, eol));
    if (line_.size() > max_line_) {
      overflowed_ = true;
      break;
    }
    if (eol == std::string_view::npos) break;
    bytes.remove_prefix(eol + 1);
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
        if (data_.size() > max_event_) {
          overflowed_ = true;
          break;
        }
      }
    }
    line_.clear();
  }
  if (overflowed_) {
    line_ = {};
    data_ = {};
  }
  return events;
}

}  // namespace tollgate::backends
