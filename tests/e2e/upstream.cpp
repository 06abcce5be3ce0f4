#include "upstream.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
#include <thread>

namespace tollgate::test {

using Clock = std::chrono::steady_clock;

FakeServer::FakeServer(const std::string& script, const std::vector<std::string>& args) {
  int in[2], out[2];
  if (pipe(in) != 0 || pipe(out) != 0) throw std::runtime_error("pipe failed");
  std::string path = std::string(TOLLGATE_SOURCE_DIR) + "/tests/e2e/" + script;
  std::vector<std::string> argv_text = {"python3", path};
  argv_text.insert(argv_text.end(), args.begin(), args.end());
  pid_ = fork();
  if (pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // a crashed test leaves no fake behind
    dup2(in[0], 0);
    dup2(out[1], 1);
    close(in[1]);
    close(out[0]);
    std::vector<char*> argv;
    for (auto& a : argv_text) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp("python3", argv.data());
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  stdin_fd_ = in[1];
  std::string line;
  auto deadline = Clock::now() + 20s;
  while (line.find('\n') == std::string::npos && Clock::now() < deadline) {
    pollfd p{out[0], POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char buf[64];
    auto n = read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    line.append(buf, static_cast<std::size_t>(n));
  }
  close(out[0]);
  if (line.find('\n') == std::string::npos) throw std::runtime_error(script + " did not start");
  port_ = static_cast<std::uint16_t>(std::stoi(line));
}

FakeServer::~FakeServer() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

FakeOpenAI::FakeOpenAI(const std::string& cert, const std::string& key)
    : server_("fake_openai.py", cert.empty() ? std::vector<std::string>{}
                                             : std::vector<std::string>{"--cert", cert, "--key", key}) {}

boost::json::value FakeOpenAI::last() {
  HttpClient client(port());
  return client.get("/_last").json();
}

boost::json::value FakeOpenAI::stats() {
  HttpClient client(port());
  return client.get("/_stats").json();
}

TestCertificates make_test_certificates(const TempDir& dir) {
  TestCertificates c{dir.file("ca.pem"), dir.file("server.pem"), dir.file("server.key")};
  auto ext = dir.file("ext.cnf");
  std::string d = dir.path().string();
  std::string script =
      "cd '" + d + "' && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > " + ext +
      " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem"
      " -days 2 -subj '/CN=Tollgate Test CA' 2>/dev/null"
      " && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr"
      " -subj '/CN=localhost' 2>/dev/null"
      " && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2"
      " -extfile " + ext + " 2>/dev/null";
  if (std::system(script.c_str()) != 0) throw std::runtime_error("openssl could not make the test certificates");
  return c;
}

std::uint16_t closed_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::vector<std::string> sse_data(const std::string& body) {
  std::vector<std::string> events;
  std::size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    auto end = body.find("\n\n", pos);
    if (end == std::string::npos) break;
    events.push_back(body.substr(pos + 6, end - pos - 6));
    pos = end;
  }
  return events;
}

std::int64_t wait_usage_rows(const std::string& db, const std::string& where, std::int64_t n) {
  auto deadline = Clock::now() + 15s;
  std::int64_t got = -1;
  while (Clock::now() < deadline) {
    got = count_usage_rows(db, where);
    if (got == n) return got;
    std::this_thread::sleep_for(50ms);
  }
  return got;
}

}  // namespace tollgate::test
