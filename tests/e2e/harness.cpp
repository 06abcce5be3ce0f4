#include "harness.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iostream>
#include <random>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace tollgate::test {
namespace {

using Clock = std::chrono::steady_clock;

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Waits for `pid` up to `timeout`; returns the exit code, 128+signal, or -1.
int wait_exit(int pid, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    int status = 0;
    int r = waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (Clock::now() > deadline) return -1;
    std::this_thread::sleep_for(10ms);
  }
}

// fork + exec of the binary with stdout/stderr to files; env additions applied in the child.
int spawn(const std::vector<std::string>& args, const std::string& out_path, const std::string& err_path,
          const std::vector<std::pair<std::string, std::string>>& env, const std::string& cwd) {
  int pid = fork();
  if (pid != 0) return pid;
  // A test that crashes must not leave a gateway behind.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int err = err_path == out_path ? out : open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  dup2(out, 1);
  dup2(err, 2);
  if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(126);
  for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
  std::vector<char*> argv;
  std::string binary = TOLLGATE_BINARY;
  argv.push_back(binary.data());
  std::vector<std::string> copy = args;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  execv(binary.c_str(), argv.data());
  _exit(127);
}

}  // namespace

TempDir::TempDir() {
  static std::atomic<int> counter{0};
  std::random_device rd;
  path_ = std::filesystem::temp_directory_path() /
          ("tollgate-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" + std::to_string(rd()));
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  // TOLLGATE_TEST_KEEP=1 keeps logs and databases for a post-mortem.
  if (std::getenv("TOLLGATE_TEST_KEEP")) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CliResult run_tollgate(const std::vector<std::string>& args, std::chrono::seconds timeout, const EnvVars& env) {
  TempDir dir;
  auto out = dir.file("out"), err = dir.file("err");
  int pid = spawn(args, out, err, env, "");
  CliResult r;
  r.exit_code = wait_exit(pid, timeout);
  if (r.exit_code == -1) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
  r.out = read_file(out);
  r.err = read_file(err);
  return r;
}

std::string create_key(const std::string& db, const std::string& user, const std::vector<std::string>& extra) {
  std::vector<std::string> args = {"keys", "create", "--user", user, "--db", db};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = run_tollgate(args);
  if (r.exit_code != 0) throw std::runtime_error("keys create failed: " + r.err);
  auto out = r.out;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out.substr(out.rfind('\n') + 1);
}

void wait_for_key(std::uint16_t port, const std::string& key) {
  for (int i = 0; i < 100; ++i) {
    HttpClient client(port);
    if (client.get("/v1/models", key).status != 401) return;
    std::this_thread::sleep_for(50ms);
  }
  throw std::runtime_error("the gateway never accepted key " + key.substr(0, 11));
}

GatewayProcess::GatewayProcess(const TempDir& dir, Options options) {
  static std::atomic<int> counter{0};
  std::string tag = std::to_string(counter++);
  db_ = options.db.empty() ? dir.file("tollgate-" + tag + ".db") : options.db;
  log_path_ = dir.file("gateway-" + tag + ".log");
  std::vector<std::string> args = {"serve", "--listen", "127.0.0.1:0", "--db", db_};
  if (!options.config_yaml.empty()) {
    auto config = dir.file("tollgate-" + tag + ".yaml");
    std::ofstream(config) << options.config_yaml;
    args.push_back("--config");
    args.push_back(config);
  }
  pid_ = spawn(args, log_path_, log_path_, options.env, dir.path().string());
  static const std::regex listening(R"(listening on http://127\.0\.0\.1:(\d+))");
  static const std::regex admin(R"(admin key \(shown once, keep it\): (\S+))");
  auto deadline = Clock::now() + 20s;
  while (Clock::now() < deadline) {
    auto text = read_file(log_path_);
    std::smatch m;
    if (std::regex_search(text, m, listening)) {
      port_ = static_cast<std::uint16_t>(std::stoi(m[1]));
      if (std::regex_search(text, m, admin)) admin_key_ = m[1];
      return;
    }
    if (!running()) throw std::runtime_error("tollgate exited at start: " + text);
    std::this_thread::sleep_for(20ms);
  }
  throw std::runtime_error("tollgate did not start listening: " + read_file(log_path_));
}

GatewayProcess::~GatewayProcess() {
  // A test that ends by an exception (a failed REQUIRE, no response), or a
  // gateway that died on its own, leaves its log in the test's output: CI
  // shows nothing else of a failure.
  bool died = false;
  int status = 0;
  if (pid_ > 0) {
    died = waitpid(pid_, &status, WNOHANG) == pid_;
    if (!died) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  if (died || std::uncaught_exceptions() > 0) {
    auto text = read_file(log_path_);
    constexpr std::size_t kTail = 6000;
    if (text.size() > kTail) text = "..." + text.substr(text.size() - kTail);
    std::cerr << "--- tollgate " << (died ? "exited on its own (wait status " + std::to_string(status) + ")" : "log")
              << ", " << log_path_ << ":\n"
              << text << "\n---\n";
  }
}

bool GatewayProcess::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

int GatewayProcess::stop(int signal, std::chrono::seconds timeout) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  int code = wait_exit(pid_, timeout);
  if (code != -1) pid_ = -1;
  return code;
}

std::string GatewayProcess::log() const { return read_file(log_path_); }

std::string HttpResponse::header(const std::string& name) const {
  auto it = headers.find(name);
  return it == headers.end() ? std::string() : it->second;
}

boost::json::value HttpResponse::json() const { return boost::json::parse(body); }

HttpClient::HttpClient(std::uint16_t port, std::chrono::milliseconds timeout) : timeout_(timeout) {
  fd_ = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    throw std::runtime_error("connect failed: " + std::string(strerror(errno)));
  }
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

HttpClient::~HttpClient() {
  if (fd_ >= 0) close(fd_);
}

bool HttpClient::send_raw(std::string_view bytes) {
  while (!bytes.empty()) {
    auto n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

bool HttpClient::fill(std::chrono::milliseconds wait) {
  pollfd p{fd_, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(wait.count())) <= 0) return false;
  char chunk[16384];
  auto n = recv(fd_, chunk, sizeof chunk, 0);
  if (n <= 0) return false;
  buffer_.append(chunk, static_cast<std::size_t>(n));
  return true;
}

std::string HttpClient::read_some(std::chrono::milliseconds wait) {
  fill(wait);
  return std::exchange(buffer_, {});
}

bool HttpClient::wait_closed(std::chrono::milliseconds wait) {
  auto deadline = Clock::now() + wait;
  while (Clock::now() < deadline) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    char chunk[4096];
    auto n = recv(fd_, chunk, sizeof chunk, 0);
    if (n <= 0) return true;
  }
  return false;
}

std::optional<HttpResponse> HttpClient::read_response() {
  auto deadline = Clock::now() + timeout_;
  auto remaining = [&] {
    return std::max(1ms, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  };
  std::size_t head_end;
  while ((head_end = buffer_.find("\r\n\r\n")) == std::string::npos) {
    if (Clock::now() > deadline || !fill(remaining())) return std::nullopt;
  }
  HttpResponse r;
  std::istringstream head(buffer_.substr(0, head_end));
  std::string line;
  std::getline(head, line);
  if (line.size() < 12) return std::nullopt;
  r.status = std::stoi(line.substr(9, 3));
  while (std::getline(head, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    auto value = line.substr(colon + 1);
    while (!value.empty() && value.front() == ' ') value.erase(0, 1);
    r.headers[name] = value;
  }
  buffer_.erase(0, head_end + 4);
  if (r.status == 100) return read_response();
  if (r.header("transfer-encoding") == "chunked") {
    for (;;) {
      std::size_t eol;
      while ((eol = buffer_.find("\r\n")) == std::string::npos) {
        if (Clock::now() > deadline || !fill(remaining())) return std::nullopt;
      }
      std::size_t size = std::stoul(buffer_.substr(0, eol), nullptr, 16);
      while (buffer_.size() < eol + 2 + size + 2) {
        if (Clock::now() > deadline || !fill(remaining())) return std::nullopt;
      }
      r.body += buffer_.substr(eol + 2, size);
      buffer_.erase(0, eol + 2 + size + 2);
      if (size == 0) break;
    }
  } else if (auto cl = r.header("content-length"); !cl.empty()) {
    std::size_t size = std::stoul(cl);
    while (buffer_.size() < size) {
      if (Clock::now() > deadline || !fill(remaining())) return std::nullopt;
    }
    r.body = buffer_.substr(0, size);
    buffer_.erase(0, size);
  } else {
    while (Clock::now() < deadline && fill(remaining())) {
    }
    r.body = std::exchange(buffer_, {});
  }
  return r;
}

HttpResponse HttpClient::request(const std::string& method, const std::string& target, const std::string& body,
                                 const Headers& headers) {
  std::string req = method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  for (const auto& [k, v] : headers) req += k + ": " + v + "\r\n";
  if (!body.empty() || method == "POST") {
    req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  req += "\r\n" + body;
  if (!send_raw(req)) throw std::runtime_error("send failed");
  auto r = read_response();
  if (!r) throw std::runtime_error("no response to " + method + " " + target);
  return *r;
}

HttpResponse HttpClient::post(const std::string& target, const std::string& key, const std::string& body) {
  return request("POST", target, body, {{"Authorization", "Bearer " + key}});
}

HttpResponse HttpClient::get(const std::string& target, const std::string& key) {
  if (key.empty()) return request("GET", target);
  return request("GET", target, "", {{"Authorization", "Bearer " + key}});
}

std::string raw_post(const std::string& target, const std::string& key, const std::string& body) {
  return "POST " + target + " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

std::string chat_body(const std::string& model, const std::string& content, const std::string& extra) {
  return R"({"model":")" + model + R"(","messages":[{"role":"user","content":)" +
         boost::json::serialize(boost::json::value(content)) + "}]" + (extra.empty() ? "" : "," + extra) + "}";
}

std::int64_t count_usage_rows(const std::string& db, const std::string& where) {
  sqlite3* handle = nullptr;
  if (sqlite3_open_v2(db.c_str(), &handle, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(handle);
    throw std::runtime_error("cannot open " + db);
  }
  sqlite3_busy_timeout(handle, 5000);
  std::string sql = "SELECT COUNT(*) FROM usage_events WHERE " + where;
  sqlite3_stmt* stmt = nullptr;
  std::int64_t n = -1;
  if (sqlite3_prepare_v2(handle, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK && sqlite3_step(stmt) == SQLITE_ROW) {
    n = sqlite3_column_int64(stmt, 0);
  }
  sqlite3_finalize(stmt);
  sqlite3_close(handle);
  if (n < 0) throw std::runtime_error("cannot count usage rows in " + db);
  return n;
}

// Every row of `sql` as text (NULL as "NULL"), read with the sqlite3 C API.
std::vector<std::vector<std::string>> sql_rows(const std::string& db, const std::string& sql) {
  sqlite3* handle = nullptr;
  // Read-write so a WAL left behind by a killed process can be recovered.
  if (sqlite3_open_v2(db.c_str(), &handle, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
    std::string message = handle ? sqlite3_errmsg(handle) : "out of memory";
    sqlite3_close(handle);
    throw std::runtime_error("cannot open " + db + ": " + message);
  }
  sqlite3_busy_timeout(handle, 5000);
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(handle, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
    std::string message = sqlite3_errmsg(handle);
    sqlite3_close(handle);
    throw std::runtime_error("cannot prepare '" + sql + "': " + message);
  }
  std::vector<std::vector<std::string>> rows;
  int rc;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    std::vector<std::string> row;
    for (int i = 0; i < sqlite3_column_count(stmt); ++i) {
      auto text = sqlite3_column_text(stmt, i);
      row.emplace_back(text ? reinterpret_cast<const char*>(text) : "NULL");
    }
    rows.push_back(std::move(row));
  }
  std::string message = sqlite3_errmsg(handle);
  sqlite3_finalize(stmt);
  sqlite3_close(handle);
  if (rc != SQLITE_DONE) throw std::runtime_error("query '" + sql + "' failed: " + message);
  return rows;
}

std::int64_t sql_int(const std::string& db, const std::string& sql) {
  auto rows = sql_rows(db, sql);
  if (rows.size() != 1 || rows[0].size() != 1 || rows[0][0] == "NULL") {
    throw std::runtime_error("expected one integer from '" + sql + "'");
  }
  return std::stoll(rows[0][0]);
}

std::pair<int, std::string> promtool_check(const TempDir& dir, const std::string& text) {
  if (std::system("command -v promtool > /dev/null 2>&1") != 0) return {-1, "promtool is not installed"};
  auto path = dir.file("metrics.txt");
  std::ofstream(path) << text;
  FILE* pipe = popen(("promtool check metrics < '" + path + "' 2>&1").c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  char chunk[4096];
  std::size_t n;
  while ((n = fread(chunk, 1, sizeof chunk, pipe)) > 0) output.append(chunk, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

}  // namespace tollgate::test
