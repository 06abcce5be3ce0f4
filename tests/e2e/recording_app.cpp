#include "recording_app.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <stdexcept>

namespace tollgate::test {
namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The first value of a header in `head`, by case-insensitive name.
std::optional<std::string> header(const std::string& head, const std::string& name) {
  std::size_t at = head.find("\r\n");
  while (at != std::string::npos && at + 2 < head.size()) {
    auto end = head.find("\r\n", at + 2);
    if (end == std::string::npos) break;
    auto line = head.substr(at + 2, end - at - 2);
    auto colon = line.find(':');
    if (colon != std::string::npos && lower(line.substr(0, colon)) == lower(name)) {
      auto value = line.substr(colon + 1);
      while (!value.empty() && value.front() == ' ') value.erase(0, 1);
      return value;
    }
    at = end;
  }
  return std::nullopt;
}

enum class Framed { complete, incomplete, broken };

// Decodes a chunked body at the start of `data`; `used` is how much it took.
Framed dechunk(const std::string& data, std::string& body, std::size_t& used) {
  std::size_t at = 0;
  body.clear();
  for (;;) {
    auto eol = data.find("\r\n", at);
    if (eol == std::string::npos) return Framed::incomplete;
    auto size_text = data.substr(at, eol - at);
    size_text = size_text.substr(0, size_text.find(';'));
    if (size_text.empty() || size_text.size() > 8 || !std::all_of(size_text.begin(), size_text.end(), [](char c) {
          return std::isxdigit(static_cast<unsigned char>(c));
        })) {
      return Framed::broken;
    }
    std::size_t size = std::stoul(size_text, nullptr, 16);
    at = eol + 2;
    if (size == 0) {
      // Trailer lines until the empty one.
      for (;;) {
        auto end = data.find("\r\n", at);
        if (end == std::string::npos) return Framed::incomplete;
        bool empty = end == at;
        at = end + 2;
        if (empty) {
          used = at;
          return Framed::complete;
        }
      }
    }
    if (data.size() < at + size + 2) return Framed::incomplete;
    body.append(data, at, size);
    if (data.compare(at + size, 2, "\r\n") != 0) return Framed::broken;
    at += size + 2;
  }
}

bool send_all(int fd, const std::string& bytes) {
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    auto n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<std::size_t>(n);
  }
  return true;
}

std::string response(int number, const std::string& target, bool head_request) {
  std::string body = "app-response-" + std::to_string(number);
  std::string n = std::to_string(number);
  if (target.starts_with("/chunked/")) {
    std::string out = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App-Response: " + n + "\r\n\r\n";
    if (head_request) return out;
    auto half = body.size() / 2;
    char size1[24], size2[24];
    std::snprintf(size1, sizeof size1, "%zx", half);
    std::snprintf(size2, sizeof size2, "%zx", body.size() - half);
    return out + size1 + "\r\n" + body.substr(0, half) + "\r\n" + size2 + "\r\n" + body.substr(half) + "\r\n0\r\n\r\n";
  }
  std::string out = "HTTP/1.1 200 OK\r\n";
  if (target.starts_with("/conn-cl/")) out += "Connection: Content-Length, Transfer-Encoding\r\n";
  if (target.starts_with("/cl-te/")) out += "Transfer-Encoding: chunked\r\n";  // beside Content-Length: unframed
  out += "Content-Length: " + std::to_string(body.size()) + "\r\nX-App-Response: " + n + "\r\n\r\n";
  if (!head_request) out += body;
  if (target.starts_with("/extra/")) {
    out += "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-App-Response: smuggled\r\n\r\nsmuggled";
  }
  return out;
}

}  // namespace

RecordingApp::RecordingApp() {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 64) != 0) {
    throw std::runtime_error("RecordingApp: cannot listen");
  }
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

RecordingApp::~RecordingApp() {
  stopping_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);
  acceptor_.join();
  ::close(listen_fd_);
  std::vector<std::thread> workers;
  {
    std::lock_guard lock(mutex_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    workers = std::move(workers_);
  }
  for (auto& w : workers) w.join();
}

void RecordingApp::accept_loop() {
  while (!stopping_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    int fd = ::accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) continue;
    std::lock_guard lock(mutex_);
    int connection = static_cast<int>(connection_bytes_.size());
    connection_bytes_.emplace_back();
    fds_.push_back(fd);
    workers_.emplace_back([this, fd, connection] { serve(fd, connection); });
  }
}

void RecordingApp::serve(int fd, int connection) {
  std::string pending;
  char buf[16384];
  while (!stopping_) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    pending.append(buf, static_cast<std::size_t>(n));
    {
      std::lock_guard lock(mutex_);
      if (connection < static_cast<int>(connection_bytes_.size())) connection_bytes_[connection].append(buf, n);
    }
    bool broken = false;
    for (;;) {
      auto head_end = pending.find("\r\n\r\n");
      if (head_end == std::string::npos) break;
      Request r;
      r.connection = connection;
      r.head = pending.substr(0, head_end + 4);
      std::string rest = pending.substr(head_end + 4);
      std::size_t used = 0;
      auto te = header(r.head, "Transfer-Encoding");
      if (te && lower(*te).find("chunked") != std::string::npos) {
        auto framed = dechunk(rest, r.body, used);
        if (framed == Framed::incomplete) break;
        if (framed == Framed::broken) {
          broken = true;
          break;
        }
      } else {
        std::size_t length = 0;
        if (auto cl = header(r.head, "Content-Length")) length = std::stoul(*cl);
        if (rest.size() < length) break;
        r.body = rest.substr(0, length);
        used = length;
      }
      r.bytes = pending.substr(0, head_end + 4 + used);
      pending.erase(0, head_end + 4 + used);
      auto line_end = r.head.find("\r\n");
      auto line = r.head.substr(0, line_end);
      auto sp1 = line.find(' ');
      auto sp2 = line.find(' ', sp1 + 1);
      std::string target = sp1 == std::string::npos ? "" : line.substr(sp1 + 1, sp2 - sp1 - 1);
      bool head_request = line.starts_with("HEAD ");
      int number;
      {
        std::lock_guard lock(mutex_);
        number = ++responses_;
        requests_.push_back(std::move(r));
      }
      if (!send_all(fd, response(number, target, head_request))) {
        broken = true;
        break;
      }
    }
    if (broken) break;
  }
  ::shutdown(fd, SHUT_RDWR);
  std::lock_guard lock(mutex_);
  std::erase(fds_, fd);
  ::close(fd);
}

std::vector<RecordingApp::Request> RecordingApp::requests() const {
  std::lock_guard lock(mutex_);
  return requests_;
}

std::string RecordingApp::all_bytes() const {
  std::lock_guard lock(mutex_);
  std::string all;
  for (const auto& b : connection_bytes_) all += b;
  return all;
}

std::size_t RecordingApp::wait_requests(std::size_t n, std::chrono::milliseconds wait) const {
  auto deadline = std::chrono::steady_clock::now() + wait;
  for (;;) {
    std::size_t have;
    {
      std::lock_guard lock(mutex_);
      have = requests_.size();
    }
    if (have >= n || std::chrono::steady_clock::now() >= deadline) return have;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void RecordingApp::reset() {
  std::lock_guard lock(mutex_);
  requests_.clear();
  for (auto& b : connection_bytes_) b.clear();
}

}  // namespace tollgate::test
