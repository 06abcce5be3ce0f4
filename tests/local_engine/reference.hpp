// The shared test models and their reference outputs (../shared/models).
#pragma once

#include <cctype>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace tollgate::test {

inline std::string shared_model(const std::string& name) {
  return std::string(TOLLGATE_SOURCE_DIR) + "/../shared/models/" + name;
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A reference .ids file: prompt ids after BOS, then generated ids; the
// generator's trailing statistics line is not part of it.
inline std::vector<std::int32_t> reference_ids(const std::string& name) {
  std::istringstream in(read_text_file(shared_model("reference/" + name)));
  std::vector<std::int32_t> ids;
  std::string word;
  while (in >> word) {
    if (word.empty() || !std::isdigit(static_cast<unsigned char>(word[0]))) break;
    ids.push_back(std::stoi(word));
  }
  return ids;
}

inline std::string trim_right(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

}  // namespace tollgate::test
