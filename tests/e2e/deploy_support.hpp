// Helpers for the deployment tests (nginx_test.cpp, deploy_test.cpp): shell
// commands with a time bound, free loopback ports, child daemons (nginx,
// Prometheus) that die with the test, YAML read through python3-yaml, and the
// shipped files under the source tree.
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"

namespace tollgate::test::deploy {

inline std::string source_path(const std::string& relative) { return std::string(TOLLGATE_SOURCE_DIR) + "/" + relative; }

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << text;
}

// Replaces every `from` and returns how many there were, so callers can insist
// the shipped file still has what they rewrite.
inline int replace_all(std::string& text, const std::string& from, const std::string& to) {
  int n = 0;
  for (auto pos = text.find(from); pos != std::string::npos; pos = text.find(from, pos + to.size())) {
    text.replace(pos, from.size(), to);
    ++n;
  }
  return n;
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// `sh -c command`, killed after `seconds` by coreutils' timeout (exit 124).
inline CommandResult run_command(const std::string& command, int seconds = 60) {
  std::string full = "timeout -s KILL " + std::to_string(seconds) + " sh -c " + shell_quote(command) + " 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (!pipe) throw std::runtime_error("popen failed: " + command);
  CommandResult r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// A port nothing listens on right now (the kernel's pick for port 0).
inline std::uint16_t free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    throw std::runtime_error("no free port");
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// A daemon started through `sh -c "exec COMMAND"`, output to `log`; SIGTERM,
// then SIGKILL, when the test ends.
class ChildProcess {
 public:
  ChildProcess(const std::string& command, std::string log) : log_(std::move(log)) {
    pid_ = fork();
    if (pid_ == 0) {
      // A test that crashes skips the destructor: the daemon dies with it anyway.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      std::string full = "exec " + command + " >" + shell_quote(log_) + " 2>&1";
      execl("/bin/sh", "sh", "-c", full.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    if (pid_ < 0) throw std::runtime_error("fork failed");
  }
  ~ChildProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 200; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  bool running() { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  std::string log() const {
    try {
      return read_text(log_);
    } catch (const std::exception&) {
      return "";
    }
  }

 private:
  std::string log_;
  int pid_ = -1;
};

// Every YAML document in `path`, as JSON, read by Debian's python3-yaml
// (safe_load_all): what a YAML consumer sees, not what a regex guesses.
inline boost::json::array yaml_documents(const std::string& path) {
  auto r = run_command("/usr/bin/python3 -c 'import sys, json, yaml; "
                       "json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)' " +
                           shell_quote(path),
                       30);
  if (r.exit_code != 0) throw std::runtime_error("YAML does not parse: " + path + ": " + r.output);
  return boost::json::parse(r.output).as_array();
}

inline boost::json::value yaml_document(const std::string& path) {
  auto docs = yaml_documents(path);
  if (docs.size() != 1) throw std::runtime_error(path + ": expected one YAML document");
  return docs[0];
}

// Percent-encoding for a query-string value.
inline std::string url_encode(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// GET on 127.0.0.1:port, or status 0 when nothing answers.
inline HttpResponse try_get(std::uint16_t port, const std::string& target) {
  try {
    HttpClient client(port, std::chrono::seconds(10));
    return client.get(target);
  } catch (const std::exception&) {
    return {};
  }
}

// The metric names in Prometheus text exposition: every sample's name, plus
// the _bucket/_sum/_count a histogram (or summary) family declares, so a
// family with no series yet still counts as exported.
inline std::set<std::string> exposition_names(const std::string& text) {
  std::set<std::string> names;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("# TYPE ", 0) == 0) {
      std::istringstream fields(line.substr(7));
      std::string name, type;
      fields >> name >> type;
      names.insert(name);
      if (type == "histogram") {
        for (const char* s : {"_bucket", "_sum", "_count"}) names.insert(name + s);
      } else if (type == "summary") {
        for (const char* s : {"_sum", "_count"}) names.insert(name + s);
      }
    } else if (!line.empty() && line[0] != '#') {
      names.insert(line.substr(0, line.find_first_of("{ ")));
    }
  }
  return names;
}

// `seconds` in a duration such as "20s", "2m", "500ms" (whole seconds, rounded up).
inline long duration_seconds(const std::string& d) {
  if (d.size() > 2 && d.ends_with("ms")) return (std::stol(d.substr(0, d.size() - 2)) + 999) / 1000;
  if (d.ends_with("s")) return std::stol(d.substr(0, d.size() - 1));
  if (d.ends_with("m")) return std::stol(d.substr(0, d.size() - 1)) * 60;
  if (d.ends_with("h")) return std::stol(d.substr(0, d.size() - 1)) * 3600;
  throw std::runtime_error("not a duration: " + d);
}

}  // namespace tollgate::test::deploy
