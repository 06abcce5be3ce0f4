// One throwaway PostgreSQL server per test process, in a temp directory under
// /tmp, and a fresh database on it for each test.
#include "tests/metering/temp_postgres.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pwd.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace tollgate::metering::test {
namespace {

namespace fs = std::filesystem;

// Debian's PostgreSQL 15 server binaries (each major version has its own directory).
const fs::path kBinDir = "/usr/lib/postgresql/15/bin";
// The superuser initdb creates; with --auth=trust it needs no password.
constexpr const char* kUser = "tollgate";

// PostgreSQL refuses to run as root, so as root its tools run as this user.
bool running_as_root() { return ::geteuid() == 0; }

// The last lines of a log, for error messages.
std::string tail(const fs::path& path, std::size_t max_lines = 30) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string text;
  for (std::size_t i = lines.size() > max_lines ? lines.size() - max_lines : 0; i < lines.size(); ++i) {
    text += "  " + lines[i] + "\n";
  }
  return text.empty() ? "  (empty)\n" : text;
}

// Single quotes for the shell pg_ctl starts the server through (its -o value).
std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// A loopback port nobody listens on now. Another process could take it before
// the server binds it; the window is short and the error would say so.
int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error(std::string("temp postgres: socket: ") + std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  const int error = errno;
  ::close(fd);
  if (!ok) throw std::runtime_error(std::string("temp postgres: no free loopback port: ") + std::strerror(error));
  return ntohs(address.sin_port);
}

// Runs a PostgreSQL tool (as the postgres user when we are root) with stdin
// from /dev/null and stdout/stderr appended to `log`, in `dir`: the caller's
// working directory may be unreadable to postgres, and the server pg_ctl starts
// must not inherit our stdout (ctest waits for that pipe to close). Returns
// whether it exited with status 0. posix_spawn rather than fork keeps this safe
// in a multithreaded test binary.
bool run(const fs::path& dir, const fs::path& log, std::vector<std::string> args) {
  if (running_as_root()) args.insert(args.begin(), {"runuser", "-u", "postgres", "--"});
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_APPEND, 0);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawn_file_actions_addchdir_np(&actions, dir.c_str());
  pid_t pid = 0;
  const int error = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    std::ofstream(log, std::ios::app) << "cannot run " << argv[0] << ": " << std::strerror(error) << "\n";
    return false;
  }

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return false;
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// The server: started by the constructor, stopped and its directory removed by
// the destructor. A failed start is remembered, so every later test fails at
// once with the same message instead of waiting for another start.
class PostgresServer {
 public:
  PostgresServer() {
    try {
      start();
    } catch (const std::exception& e) {
      start_error_ = e.what();
      stop_and_remove();
    }
  }
  ~PostgresServer() { stop_and_remove(); }
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  // Stops the server (fast: connections are cut) and starts it again on the
  // same port and data, for tests of what a client does while it is away.
  void stop() {
    if (!start_error_.empty()) throw std::runtime_error(start_error_);
    if (!run(dir_, log_, {(kBinDir / "pg_ctl").string(), "stop", "-m", "fast", "-w", "-t", "30", "-D", data_.string()})) {
      fail("pg_ctl stop failed");
    }
  }
  void start_again() {
    if (!start_error_.empty()) throw std::runtime_error(start_error_);
    if (!run(dir_, log_,
             {(kBinDir / "pg_ctl").string(), "start", "-w", "-t", "30", "-D", data_.string(), "-l", log_.string(), "-o",
              options_})) {
      fail("pg_ctl start (again) failed");
    }
  }

  // The URL of database `name`; throws when the server did not start.
  std::string url(const std::string& name) const {
    if (!start_error_.empty()) throw std::runtime_error(start_error_);
    return "postgresql://" + std::string(kUser) + "@127.0.0.1:" + std::to_string(port_) + "/" + name;
  }

 private:
  void start() {
    char dir_template[] = "/tmp/tollgate-postgres-XXXXXX";
    if (::mkdtemp(dir_template) == nullptr) {
      throw std::runtime_error(std::string("temp postgres: mkdtemp: ") + std::strerror(errno));
    }
    dir_ = dir_template;
    log_ = dir_ / "postgres.log";
    std::ofstream(log_).close();
    if (running_as_root()) {
      const passwd* postgres = ::getpwnam("postgres");
      if (postgres == nullptr) throw std::runtime_error("temp postgres: running as root and no user 'postgres'");
      for (const fs::path& path : {dir_, log_}) {
        if (::chown(path.c_str(), postgres->pw_uid, postgres->pw_gid) != 0) {
          throw std::runtime_error("temp postgres: chown " + path.string() + ": " + std::strerror(errno));
        }
      }
    }

    data_ = dir_ / "data";
    const fs::path& data = data_;
    // -N: no fsync; the cluster lives only as long as this process.
    if (!run(dir_, log_,
             {(kBinDir / "initdb").string(), "-D", data.string(), "-U", kUser, "--auth=trust", "-E", "UTF8",
              "--locale=C", "-N"})) {
      fail("initdb failed");
    }
    // initdb's chatter would bury the server's own messages in a failure's log tail.
    std::ofstream(log_, std::ios::trunc).close();

    port_ = free_loopback_port();
    // Durability is pointless for test data; dropping it makes CREATE DATABASE
    // and commits cheap.
    options_ = "-c listen_addresses=127.0.0.1 -c port=" + std::to_string(port_) +
                                " -c unix_socket_directories=" + shell_quote(dir_.string()) +
                                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                                " -c max_connections=200";
    // A failed start may still leave a server running (up but slow to
    // answer), so from here on it is always stopped.
    started_ = true;
    // -w -t 30: pg_ctl polls until the server accepts connections, gives up
    // after 30 s, and notices at once when the server exits during startup.
    if (!run(dir_, log_,
             {(kBinDir / "pg_ctl").string(), "start", "-w", "-t", "30", "-D", data.string(), "-l", log_.string(), "-o",
              options_})) {
      fail("pg_ctl start failed");
    }
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("temp postgres: " + what + "; log tail:\n" + tail(log_));
  }

  void stop_and_remove() {
    if (started_) {
      // immediate: no shutdown checkpoint, the data is about to be deleted.
      run(dir_, log_,
          {(kBinDir / "pg_ctl").string(), "stop", "-m", "immediate", "-w", "-t", "30", "-D", (dir_ / "data").string()});
      started_ = false;
    }
    if (!dir_.empty()) {
      std::error_code ignored;
      fs::remove_all(dir_, ignored);
      dir_.clear();
    }
  }

  fs::path dir_;
  fs::path log_;
  fs::path data_;
  std::string options_;  // the server's -o
  int port_ = 0;
  bool started_ = false;
  std::string start_error_;
};

// Started on first use; C++ makes the initialisation thread-safe, and the
// destructor runs at exit.
PostgresServer& server() {
  static PostgresServer instance;
  return instance;
}

using Connection = std::unique_ptr<PGconn, decltype(&PQfinish)>;
using Result = std::unique_ptr<PGresult, decltype(&PQclear)>;

}  // namespace

std::string fresh_postgres_database() {
  static std::atomic<int> counter{0};
  const std::string name = "t" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
  const PostgresServer& postgres = server();

  const Connection connection(PQconnectdb(postgres.url("postgres").c_str()), &PQfinish);
  if (!connection || PQstatus(connection.get()) != CONNECTION_OK) {
    throw std::runtime_error("temp postgres: connect: " +
                             std::string(connection ? PQerrorMessage(connection.get()) : "out of memory"));
  }
  const Result result(PQexec(connection.get(), ("CREATE DATABASE " + name).c_str()), &PQclear);
  if (!result || PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
    throw std::runtime_error("temp postgres: CREATE DATABASE " + name + ": " + PQerrorMessage(connection.get()));
  }
  return postgres.url(name);
}

void stop_postgres() { server().stop(); }

void start_postgres_again() { server().start_again(); }

}  // namespace tollgate::metering::test
