// End-to-end test harness: the real `tollgate` binary as a child process on a
// loopback port, a small blocking HTTP/1.1 client on raw sockets (so tests can
// also send garbage), and the CLI.
#pragma once

#include <boost/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tollgate::test {

using namespace std::chrono_literals;

// A fresh directory under /tmp, removed at the end of the test.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

using EnvVars = std::vector<std::pair<std::string, std::string>>;

// Runs `tollgate ARGS...` to completion (bounded by `timeout`), with `env`
// added to the child's environment.
CliResult run_tollgate(const std::vector<std::string>& args, std::chrono::seconds timeout = 30s,
                       const EnvVars& env = {});

// `tollgate keys create --user USER EXTRA... --db DB`, returning the key (the last line).
std::string create_key(const std::string& db, const std::string& user, const std::vector<std::string>& extra = {});

// Waits (bounded) until the gateway accepts `key`. A running gateway looks an
// unknown key up before refusing it, so this is a probe more than a wait.
void wait_for_key(std::uint16_t port, const std::string& key);

// The gateway, started with `serve --listen 127.0.0.1:0` and a config file.
class GatewayProcess {
 public:
  struct Options {
    std::string config_yaml;  // empty: the embedded default
    std::string db;           // empty: a file in the temp dir
    std::vector<std::pair<std::string, std::string>> env;
  };
  explicit GatewayProcess(const TempDir& dir, Options options = {});
  ~GatewayProcess();  // SIGKILL if still running
  GatewayProcess(const GatewayProcess&) = delete;
  GatewayProcess& operator=(const GatewayProcess&) = delete;

  std::uint16_t port() const { return port_; }
  // The child's pid, -1 once it has been reaped (for tests that signal it themselves).
  int pid() const { return pid_; }
  const std::string& db() const { return db_; }
  // The admin key printed at first start (empty when it came from the environment).
  const std::string& admin_key() const { return admin_key_; }
  // Sends `signal` and waits (bounded) for the exit; returns the exit code, or
  // 128+signal when killed by one, or -1 on timeout.
  int stop(int signal, std::chrono::seconds timeout = 30s);
  bool running();
  std::string log() const;

 private:
  std::string log_path_;
  std::string db_;
  int pid_ = -1;
  std::uint16_t port_ = 0;
  std::string admin_key_;
};

struct HttpResponse {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;

  std::string header(const std::string& name) const;
  boost::json::value json() const;  // throws when the body is not JSON
};

using Headers = std::vector<std::pair<std::string, std::string>>;

// One keep-alive connection to 127.0.0.1:port.
class HttpClient {
 public:
  explicit HttpClient(std::uint16_t port, std::chrono::milliseconds timeout = 10s);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  HttpResponse request(const std::string& method, const std::string& target, const std::string& body = "",
                       const Headers& headers = {});
  // A JSON POST with a bearer key.
  HttpResponse post(const std::string& target, const std::string& key, const std::string& body);
  HttpResponse get(const std::string& target, const std::string& key = "");

  // Raw access for protocol tests.
  bool send_raw(std::string_view bytes);  // false once the peer has closed
  std::optional<HttpResponse> read_response();
  // Reads whatever arrives within `wait`; empty when nothing did.
  std::string read_some(std::chrono::milliseconds wait);
  // True when the peer closes the connection within `wait`.
  bool wait_closed(std::chrono::milliseconds wait);

 private:
  bool fill(std::chrono::milliseconds wait);
  int fd_ = -1;
  std::chrono::milliseconds timeout_;
  std::string buffer_;
};

// The bytes of a JSON POST with a bearer key, for tests that send a request
// with send_raw and read (or do not read) the answer themselves.
std::string raw_post(const std::string& target, const std::string& key, const std::string& body);

// A default chat request body.
std::string chat_body(const std::string& model, const std::string& content, const std::string& extra = "");

// The number of rows in usage_events, read straight from the SQLite file.
std::int64_t count_usage_rows(const std::string& db, const std::string& where = "1=1");

// Every row of `sql` as text (NULL as "NULL"), read straight from the SQLite file.
std::vector<std::vector<std::string>> sql_rows(const std::string& db, const std::string& sql);
// The one integer `sql` selects.
std::int64_t sql_int(const std::string& db, const std::string& sql);

// Runs `promtool check metrics` on `text` (written into `dir`); its exit code
// and output. -1 when promtool is not installed.
std::pair<int, std::string> promtool_check(const TempDir& dir, const std::string& text);

}  // namespace tollgate::test
