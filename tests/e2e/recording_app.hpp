// A raw-socket app on loopback for the attack suite: it records every byte
// each connection delivers, frames requests by its own strict reading
// (Content-Length or chunked), and answers each with a numbered response, so a
// test can assert the exact bytes the gateway forwarded and which answer
// reached which client.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tollgate::test {

class RecordingApp {
 public:
  // What the app answers; chosen per request by the first path segment the
  // request's target starts with (the rest is the normal answer):
  //   /extra/...      a second, unrequested response right after the first
  //                   (the poisoning a gateway must not pass to the next user)
  //   /conn-cl/...    "Connection: Content-Length" in the response
  //   /chunked/...    a chunked response
  RecordingApp();
  ~RecordingApp();
  RecordingApp(const RecordingApp&) = delete;
  RecordingApp& operator=(const RecordingApp&) = delete;

  std::uint16_t port() const { return port_; }

  struct Request {
    std::string bytes;  // head and body exactly as received
    std::string head;   // up to and including the blank line
    std::string body;   // decoded (chunked) or as framed
    int connection = 0;
  };
  // Every request framed so far, in arrival order.
  std::vector<Request> requests() const;
  // Everything received on every connection, in connection order: bytes a
  // request did not account for show up here too.
  std::string all_bytes() const;
  // Waits (bounded) for at least `n` requests; returns how many there are.
  std::size_t wait_requests(std::size_t n, std::chrono::milliseconds wait) const;
  // Forgets what was received (open connections stay).
  void reset();

 private:
  void accept_loop();
  void serve(int fd, int connection);

  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  mutable std::mutex mutex_;
  std::vector<std::thread> workers_;
  std::vector<int> fds_;
  std::vector<Request> requests_;
  std::vector<std::string> connection_bytes_;
  int responses_ = 0;
};

}  // namespace tollgate::test
