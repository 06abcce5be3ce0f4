#include "upstream.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
#include <thread>

namespace tollgate::test {

using Clock = std::chrono::steady_clock;

FakeOpenAI::FakeOpenAI(const std::string& cert, const std::string& key) {
  int in[2], out[2];
  if (pipe(in) != 0 || pipe(out) != 0) throw std::runtime_error("pipe failed");
  pid_ = fork();
  if (pid_ == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    close(in[1]);
    close(out[0]);
    std::string script = std::string(TOLLGATE_SOURCE_DIR) + "/tests/e2e/fake_openai.py";
    if (cert.empty()) {
      execlp("python3", "python3", script.c_str(), static_cast<char*>(nullptr));
    } else {
      execlp("python3", "python3", script.c_str(), "--cert", cert.c_str(), "--key", key.c_str(),
             static_cast<char*>(nullptr));
    }
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
  if (line.find('\n') == std::string::npos) throw std::runtime_error("fake_openai.py did not start");
  port_ = static_cast<std::uint16_t>(std::stoi(line));
}

FakeOpenAI::~FakeOpenAI() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

boost::json::value FakeOpenAI::last() {
  HttpClient client(port_);
  return client.get("/_last").json();
}

boost::json::value FakeOpenAI::stats() {
  HttpClient client(port_);
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
