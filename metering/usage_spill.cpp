#include "metering/usage_spill.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string_view>

namespace tollgate::metering {
namespace {

constexpr int kFields = 14;

void append_text(std::string& out, std::string_view text) {
  for (char c : text) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        out += c;
    }
  }
}

std::optional<std::string> unescape(std::string_view field) {
  std::string out;
  out.reserve(field.size());
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] != '\\') {
      out += field[i];
      continue;
    }
    if (++i == field.size()) return std::nullopt;
    switch (field[i]) {
      case '\\':
        out += '\\';
        break;
      case 't':
        out += '\t';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      default:
        return std::nullopt;
    }
  }
  return out;
}

std::optional<std::int64_t> number(std::string_view field) {
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), v);
  if (ec != std::errc() || end != field.data() + field.size() || field.empty()) return std::nullopt;
  return v;
}

// Empty: none.
std::optional<std::optional<std::int64_t>> optional_number(std::string_view field) {
  if (field.empty()) return std::optional<std::int64_t>();
  auto v = number(field);
  if (!v) return std::nullopt;
  return std::optional<std::int64_t>(*v);
}

}  // namespace

std::string spill_line(const UsageEvent& e) {
  std::string out;
  auto num = [&](std::optional<std::int64_t> v) {
    if (v) out += std::to_string(*v);
    out += '\t';
  };
  num(e.ts);
  num(e.user_id);
  num(e.key_id);
  append_text(out, e.route);
  out += '\t';
  append_text(out, e.model);
  out += '\t';
  append_text(out, e.backend);
  out += '\t';
  num(e.status);
  num(e.prompt_tokens);
  num(e.completion_tokens);
  num(e.latency_us);
  num(e.ttft_us);
  num(e.counted ? 1 : 0);
  num(e.estimated ? 1 : 0);
  append_text(out, e.request_id);
  return out;
}

std::optional<UsageEvent> parse_spill_line(std::string_view line) {
  std::vector<std::string_view> f;
  std::size_t start = 0;
  while (true) {
    const std::size_t tab = line.find('\t', start);
    f.push_back(line.substr(start, tab == std::string_view::npos ? std::string_view::npos : tab - start));
    if (tab == std::string_view::npos) break;
    start = tab + 1;
  }
  if (f.size() != kFields) return std::nullopt;
  UsageEvent e;
  auto ts = number(f[0]);
  auto user = optional_number(f[1]);
  auto key = optional_number(f[2]);
  auto route = unescape(f[3]);
  auto model = unescape(f[4]);
  auto backend = unescape(f[5]);
  auto status = number(f[6]);
  auto prompt = number(f[7]);
  auto completion = number(f[8]);
  auto latency = number(f[9]);
  auto ttft = optional_number(f[10]);
  auto counted = number(f[11]);
  auto estimated = number(f[12]);
  auto request_id = unescape(f[13]);
  if (!ts || !user || !key || !route || !model || !backend || !status || !prompt || !completion || !latency ||
      !ttft || !counted || !estimated || !request_id) {
    return std::nullopt;
  }
  e.ts = *ts;
  e.user_id = *user;
  e.key_id = *key;
  e.route = std::move(*route);
  e.model = std::move(*model);
  e.backend = std::move(*backend);
  e.status = static_cast<int>(*status);
  e.prompt_tokens = *prompt;
  e.completion_tokens = *completion;
  e.latency_us = *latency;
  e.ttft_us = *ttft;
  e.counted = *counted != 0;
  e.estimated = *estimated != 0;
  e.request_id = std::move(*request_id);
  return e;
}

UsageSpill::UsageSpill(std::string path) : path_(std::move(path)) {
  std::ifstream in(path_, std::ios::binary);
  if (!in) return;  // nothing left by a previous run; created at the first append
  std::string line;
  bool ends_in_newline = true;
  while (std::getline(in, line)) {
    ++pending_;
    ends_in_newline = !in.eof();
  }
  if (!ends_in_newline) {
    // A crash cut the last line: end it, so the next row starts a line of its own.
    std::ofstream end(path_, std::ios::app | std::ios::binary);
    end << '\n';
  }
}

void UsageSpill::append(std::span<const UsageEvent> rows) {
  if (rows.empty()) return;
  std::string text;
  for (const UsageEvent& e : rows) {
    text += spill_line(e);
    text += '\n';
  }
  std::ofstream out(path_, std::ios::app | std::ios::binary);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.flush();
  if (!out) throw std::runtime_error("usage spill: writing " + path_ + " failed");
  pending_ += rows.size();
}

std::vector<UsageEvent> UsageSpill::peek(std::size_t max) {
  std::vector<UsageEvent> rows;
  peeked_lines_ = 0;
  peek_end_ = read_offset_;
  std::ifstream in(path_, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(read_offset_));
  std::string line;
  while (rows.size() < max && peeked_lines_ < pending_ && std::getline(in, line)) {
    ++peeked_lines_;
    peek_end_ += line.size() + 1;
    if (auto e = parse_spill_line(line)) {
      rows.push_back(std::move(*e));
    } else {
      ++skipped_;
      std::fprintf(stderr, "usage spill: skipped a line of %s that is not a usage row\n", path_.c_str());
    }
  }
  return rows;
}

void UsageSpill::consume() {
  read_offset_ = peek_end_;
  pending_ -= std::min(pending_, peeked_lines_);
  peeked_lines_ = 0;
  if (pending_ == 0) {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
    read_offset_ = peek_end_ = 0;
  }
}

}  // namespace tollgate::metering
