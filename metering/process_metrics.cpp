// Process statistics in the names and help texts of the Prometheus client
// libraries, read from /proc on every scrape.
#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "metering/metrics.hpp"

namespace tollgate::metering {

namespace {

std::optional<std::string> read_text_file(const char* path) {
  std::FILE* file = std::fopen(path, "r");
  if (!file) return std::nullopt;
  std::string text;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, file)) > 0) text.append(buf, n);
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return std::nullopt;
  return text;
}

std::optional<double> parse_number(std::string_view s) {
  if (s.empty()) return std::nullopt;
  double value = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  return value;
}

std::vector<std::string_view> split_fields(std::string_view s) {
  std::vector<std::string_view> fields;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n')) ++i;
    const std::size_t start = i;
    while (i < s.size() && s[i] != ' ' && s[i] != '\n') ++i;
    if (i > start) fields.push_back(s.substr(start, i - start));
  }
  return fields;
}

// The fields of /proc/self/stat after "pid (comm)"; fields[0] is field 3 (state)
// of proc(5). The command name may itself contain spaces and parentheses, so
// the split starts after the last ')'.
struct ProcStat {
  std::vector<std::string_view> fields;
  std::string text;

  std::optional<double> field(std::size_t proc5_number) const {
    const std::size_t i = proc5_number - 3;
    return i < fields.size() ? parse_number(fields[i]) : std::nullopt;
  }
};

std::optional<ProcStat> read_proc_self_stat() {
  ProcStat stat;
  auto text = read_text_file("/proc/self/stat");
  if (!text) return std::nullopt;
  stat.text = std::move(*text);
  const std::size_t close = stat.text.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  stat.fields = split_fields(std::string_view(stat.text).substr(close + 1));
  return stat;
}

std::optional<double> boot_time_seconds() {
  const auto text = read_text_file("/proc/stat");
  if (!text) return std::nullopt;
  std::string_view rest(*text);
  while (!rest.empty()) {
    const std::size_t eol = rest.find('\n');
    const std::string_view line = rest.substr(0, eol);
    if (line.starts_with("btime ")) return parse_number(line.substr(6));
    if (eol == std::string_view::npos) break;
    rest.remove_prefix(eol + 1);
  }
  return std::nullopt;
}

std::optional<double> open_fds() {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return std::nullopt;
  const int own_fd = dirfd(dir);
  double count = 0;
  while (const dirent* entry = readdir(dir)) {
    const std::string_view name = entry->d_name;
    if (name == "." || name == "..") continue;
    if (name == std::to_string(own_fd)) continue;  // the descriptor reading the directory
    ++count;
  }
  closedir(dir);
  return count;
}

std::optional<double> max_fds() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return std::nullopt;
  return limit.rlim_cur == RLIM_INFINITY ? std::numeric_limits<double>::infinity()
                                         : static_cast<double>(limit.rlim_cur);
}

// A metric that could not be read is left out rather than reported as 0.
void append_metric(std::string& out, const char* name, const char* type, const char* help,
                   std::optional<double> value) {
  if (!value) return;
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
  out += name;
  out += ' ';
  out += format_sample_value(*value);
  out += '\n';
}

void collect_process_metrics(std::string& out) {
  const long ticks_per_second = sysconf(_SC_CLK_TCK);
  const long page_size = sysconf(_SC_PAGESIZE);
  const std::optional<ProcStat> stat = read_proc_self_stat();

  std::optional<double> cpu_seconds, start_time, virtual_bytes, resident_bytes;
  if (stat) {
    const auto utime = stat->field(14), stime = stat->field(15);
    const auto starttime = stat->field(22);
    const auto rss_pages = stat->field(24);
    if (utime && stime && ticks_per_second > 0) cpu_seconds = (*utime + *stime) / ticks_per_second;
    if (const auto boot = boot_time_seconds(); boot && starttime && ticks_per_second > 0) {
      start_time = *boot + *starttime / ticks_per_second;
    }
    virtual_bytes = stat->field(23);
    if (rss_pages && page_size > 0) resident_bytes = *rss_pages * page_size;
  }

  append_metric(out, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
                cpu_seconds);
  append_metric(out, "process_open_fds", "gauge", "Number of open file descriptors.", open_fds());
  append_metric(out, "process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds());
  append_metric(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", virtual_bytes);
  append_metric(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", resident_bytes);
  append_metric(out, "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                start_time);
}

}  // namespace

void add_process_collector(Registry& registry) { registry.add_collector(collect_process_metrics); }

}  // namespace tollgate::metering
