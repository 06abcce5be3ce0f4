// tollgate_fixed_rate: an open-loop HTTP/1.1 load generator for latency at a
// fixed request rate, which wrk cannot measure.
//
// Request n of the run has an intended send time start + n/rate; connection c
// of C carries the requests n with n mod C == c, so the schedule is evenly
// spaced overall and rate/C per connection. Latency counts from the intended
// time, not from when the request went out: a server that stalls delays the
// requests queued behind the stall, and that delay shows up in the figures
// (wrk2's correction for coordinated omission). Connections are keep-alive and
// never pipeline, as a browser or an SDK would not. One epoll loop per thread,
// each owning a share of the connections.
//
// Besides the latency to the last byte it records, per request, the time to
// the first body byte (for a chunked SSE answer: the first byte of chunk
// data), the service time (from the actual send, what a closed-loop tool
// reports) and the send lag (actual send minus intended) of requests whose
// connection was idle when they fell due: the generator's own scheduling
// delay. Requests that fell due while their connection still waited for an
// answer are counted as queued; their wait is in their latency.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using Nanos = std::chrono::nanoseconds;

struct Options {
  std::string host;
  std::uint16_t port = 0;
  std::string path = "/";
  std::string method;  // empty: GET, or POST when there is a body
  double rate = 1000;
  Nanos duration = std::chrono::seconds(10);
  Nanos warmup{0};
  Nanos timeout = std::chrono::seconds(2);
  int connections = 16;
  int threads = 1;
  std::vector<std::string> headers;
  std::string body;
  std::string expect;  // a response body lacking it counts as an error
};

constexpr const char* kUsage = R"(usage: tollgate_fixed_rate [options] HOST:PORT
  --path PATH           request target (default /)
  --rate N              requests per second over all connections (default 1000)
  --duration T          measured time: 10, 10s, 500ms, 1m (default 10s)
  --warmup T            sent on the same schedule before the measured time, not counted (default 0)
  --connections N       keep-alive connections (default 16)
  --threads N           epoll threads sharing the connections (default 1)
  -H, --header 'K: V'   extra request header (repeatable)
  --body TEXT           request body (the method becomes POST; Content-Type defaults to application/json)
  --body-file FILE      request body from a file
  --method M            request method (default GET, or POST with a body)
  --expect TEXT         count a 2xx answer whose body lacks TEXT as an error (e.g. "[DONE]")
  --timeout T           a request unanswered this long after its send is an error (default 2s)
Prints the achieved rate, errors, status counts, and p50/p90/p99/p99.9/max of latency (from the
intended send time to the last byte), ttfb (to the first body byte), service time (from the actual
send) and send_lag (actual minus intended send time, of requests whose connection was idle then: the
generator's own delay). "queued" counts requests that fell due while their connection was still busy.
)";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "tollgate_fixed_rate: " << message << "\n" << kUsage;
  std::exit(2);
}

// "10", "10s", "250ms", "1.5m": seconds unless a unit says otherwise.
Nanos parse_duration(const std::string& text) {
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  std::string_view unit(end);
  double scale = 1e9;
  if (unit == "ms") {
    scale = 1e6;
  } else if (unit == "us") {
    scale = 1e3;
  } else if (unit == "m") {
    scale = 60e9;
  } else if (!unit.empty() && unit != "s") {
    usage_error("not a duration: " + text);
  }
  if (end == text.c_str() || !(value >= 0)) usage_error("not a duration: " + text);
  return Nanos(static_cast<std::int64_t>(value * scale));
}

long parse_count(const std::string& text, const char* what, long min, long max) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (end == text.c_str() || *end != '\0' || value < min || value > max) {
    usage_error(std::string("bad ") + what + ": " + text);
  }
  return value;
}

Options parse_options(int argc, char** argv) {
  Options o;
  std::optional<std::string> target;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--path") {
      o.path = value();
    } else if (arg == "--rate") {
      o.rate = std::strtod(value().c_str(), nullptr);
      if (!(o.rate > 0)) usage_error("--rate must be positive");
    } else if (arg == "--duration") {
      o.duration = parse_duration(value());
    } else if (arg == "--warmup") {
      o.warmup = parse_duration(value());
    } else if (arg == "--timeout") {
      o.timeout = parse_duration(value());
    } else if (arg == "--connections") {
      o.connections = static_cast<int>(parse_count(value(), "--connections", 1, 100000));
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(parse_count(value(), "--threads", 1, 256));
    } else if (arg == "-H" || arg == "--header") {
      o.headers.push_back(value());
    } else if (arg == "--body") {
      o.body = value();
    } else if (arg == "--body-file") {
      std::ifstream in(value(), std::ios::binary);
      if (!in) usage_error("cannot read " + std::string(argv[i]));
      std::ostringstream text;
      text << in.rdbuf();
      o.body = text.str();
    } else if (arg == "--method") {
      o.method = value();
    } else if (arg == "--expect") {
      o.expect = value();
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (!arg.starts_with("-") && !target) {
      target = arg;
    } else {
      usage_error("unknown argument " + arg);
    }
  }
  if (!target) usage_error("no HOST:PORT");
  auto colon = target->rfind(':');
  if (colon == std::string::npos) usage_error("no port in " + *target);
  o.host = target->substr(0, colon);
  o.port = static_cast<std::uint16_t>(parse_count(target->substr(colon + 1), "port", 1, 65535));
  if (o.method.empty()) o.method = o.body.empty() ? "GET" : "POST";
  o.threads = std::min(o.threads, o.connections);
  return o;
}

bool has_header(const std::vector<std::string>& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(), [&](const std::string& h) {
    return h.size() > name.size() && h[name.size()] == ':' && strncasecmp(h.data(), name.data(), name.size()) == 0;
  });
}

// Every request of a run is the same bytes, built once.
std::string build_request(const Options& o) {
  std::string r = o.method + " " + o.path + " HTTP/1.1\r\n";
  if (!has_header(o.headers, "host")) r += "Host: " + o.host + ":" + std::to_string(o.port) + "\r\n";
  for (const auto& h : o.headers) r += h + "\r\n";
  if (!o.body.empty() || o.method == "POST" || o.method == "PUT") {
    if (!has_header(o.headers, "content-type")) r += "Content-Type: application/json\r\n";
    r += "Content-Length: " + std::to_string(o.body.size()) + "\r\n";
  }
  r += "\r\n";
  r += o.body;
  return r;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}

bool icontains(std::string_view haystack, std::string_view needle) {
  if (needle.size() > haystack.size()) return false;
  for (std::size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
    if (iequals(haystack.substr(i, needle.size()), needle)) return true;
  }
  return false;
}

// An incremental HTTP/1.1 response parser: status, Content-Length, chunked
// bodies, bodies ended by close, Connection: close. Without pipelining one
// response is in flight per connection, so bytes past its end are an error.
class ResponseParser {
 public:
  enum class Result { more, done, bad };

  void reset() {
    state_ = State::head;
    line_.clear();
    status_ = 0;
    close_ = false;
    body_started_ = false;
    remaining_ = 0;
  }

  // Consumes `in`; body_started() turns true with the first decoded body byte.
  Result feed(std::string_view in, std::string* body_sink) {
    std::size_t i = 0;
    while (i < in.size()) {
      switch (state_) {
        case State::head:
        case State::chunk_size:
        case State::chunk_crlf:
        case State::trailers: {
          // Line-framed parts: the head, chunk sizes, chunk ends, trailers.
          auto end = in.find('\n', i);
          std::size_t take = (end == std::string_view::npos ? in.size() : end + 1) - i;
          line_.append(in.substr(i, take));
          i += take;
          if (line_.size() > kMaxHead) return Result::bad;
          if (end == std::string_view::npos) break;
          if (!(state_ == State::head ? head_line_done() : chunk_line_done())) return Result::bad;
          break;
        }
        case State::length_body:
        case State::chunk_data:
        case State::until_close: {
          std::size_t take = in.size() - i;
          if (state_ != State::until_close) take = std::min<std::size_t>(take, remaining_);
          if (take > 0) body_started_ = true;
          if (body_sink) body_sink->append(in.substr(i, take));
          i += take;
          if (state_ == State::until_close) break;
          remaining_ -= take;
          if (remaining_ == 0) {
            if (state_ == State::length_body) {
              state_ = State::done;
            } else {
              state_ = State::chunk_crlf;
              line_.clear();
            }
          }
          break;
        }
        case State::done:
          return Result::bad;
      }
      if (state_ == State::done) return i == in.size() ? Result::done : Result::bad;
    }
    return state_ == State::done ? Result::done : Result::more;
  }

  // The server closed the connection: the end of a body framed by close.
  Result eof() {
    if (state_ != State::until_close) return Result::bad;
    state_ = State::done;
    return Result::done;
  }

  int status() const { return status_; }
  bool close() const { return close_; }
  bool body_started() const { return body_started_; }

 private:
  enum class State { head, length_body, chunk_size, chunk_data, chunk_crlf, trailers, until_close, done };
  static constexpr std::size_t kMaxHead = 64 * 1024;

  static std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
      s.remove_suffix(1);
    }
    return s;
  }

  // line_ holds the whole head so far; acts once it ends in an empty line.
  bool head_line_done() {
    if (!line_.ends_with("\r\n\r\n") && !line_.ends_with("\n\n")) return true;
    std::string_view head(line_);
    auto first_end = head.find('\n');
    std::string_view status_line = trim(head.substr(0, first_end));
    if (!status_line.starts_with("HTTP/1.") || status_line.size() < 12) return false;
    status_ = std::atoi(std::string(status_line.substr(9, 3)).c_str());
    if (status_ < 100) return false;
    bool http10 = status_line[7] == '0';
    bool keep_alive = false, chunked = false;
    std::optional<std::uint64_t> length;
    for (std::size_t pos = first_end + 1; pos < head.size();) {
      auto end = head.find('\n', pos);
      std::string_view line = trim(head.substr(pos, end - pos));
      pos = end + 1;
      auto colon = line.find(':');
      if (colon == std::string_view::npos) continue;
      std::string_view name = trim(line.substr(0, colon)), value = trim(line.substr(colon + 1));
      if (iequals(name, "content-length")) {
        length = std::strtoull(std::string(value).c_str(), nullptr, 10);
      } else if (iequals(name, "transfer-encoding")) {
        chunked = icontains(value, "chunked");
      } else if (iequals(name, "connection")) {
        close_ = close_ || icontains(value, "close");
        keep_alive = icontains(value, "keep-alive");
      }
    }
    if (http10 && !keep_alive) close_ = true;
    line_.clear();
    if (status_ < 200) {
      // An interim answer (100 Continue): the real one follows.
      return status_ != 101;
    }
    if (status_ == 204 || status_ == 304) {
      state_ = State::done;
    } else if (chunked) {
      state_ = State::chunk_size;
    } else if (length) {
      remaining_ = *length;
      state_ = remaining_ == 0 ? State::done : State::length_body;
    } else {
      close_ = true;
      state_ = State::until_close;
    }
    return true;
  }

  bool chunk_line_done() {
    std::string_view line = trim(line_);
    if (state_ == State::chunk_crlf) {
      if (!line.empty()) return false;
      state_ = State::chunk_size;
    } else if (state_ == State::chunk_size) {
      char* end = nullptr;
      std::string digits(line.substr(0, line.find(';')));
      remaining_ = std::strtoull(digits.c_str(), &end, 16);
      if (digits.empty() || end == digits.c_str()) return false;
      state_ = remaining_ == 0 ? State::trailers : State::chunk_data;
    } else if (line.empty()) {
      state_ = State::done;
    }
    line_.clear();
    return true;
  }

  State state_ = State::head;
  std::string line_;
  int status_ = 0;
  bool close_ = false;
  bool body_started_ = false;
  std::uint64_t remaining_ = 0;
};

// What one thread saw; merged after the run.
struct Tally {
  std::vector<std::int64_t> latency, ttfb, service;  // nanoseconds, measured requests only
  // Send lag of the requests whose connection was idle when they fell due:
  // the generator's own delay (its loop, and the OS scheduling its thread).
  std::vector<std::int64_t> send_lag;
  std::uint64_t queued = 0;  // measured requests that fell due while their connection still waited for an answer
  std::map<int, std::uint64_t> statuses;
  std::uint64_t scheduled = 0;  // measured requests on the schedule
  std::uint64_t errors_connect = 0, errors_io = 0, errors_timeout = 0, errors_protocol = 0, errors_body = 0,
                unfinished = 0, reconnects = 0;
  Clock::time_point last_completion{};

  void merge(const Tally& other) {
    for (auto [mine, theirs] : {std::pair{&latency, &other.latency}, std::pair{&ttfb, &other.ttfb},
                                std::pair{&service, &other.service}, std::pair{&send_lag, &other.send_lag}}) {
      mine->insert(mine->end(), theirs->begin(), theirs->end());
    }
    for (auto [status, n] : other.statuses) statuses[status] += n;
    scheduled += other.scheduled;
    queued += other.queued;
    errors_connect += other.errors_connect;
    errors_io += other.errors_io;
    errors_timeout += other.errors_timeout;
    errors_protocol += other.errors_protocol;
    errors_body += other.errors_body;
    unfinished += other.unfinished;
    reconnects += other.reconnects;
    last_completion = std::max(last_completion, other.last_completion);
  }
};

// The schedule all threads share: request n is due at start + n/rate.
struct Schedule {
  Clock::time_point start;
  double rate;
  std::uint64_t total;  // warmup and measured requests
  std::uint64_t first_measured;
  int connections;

  Clock::time_point due(std::uint64_t n) const {
    return start + Nanos(static_cast<std::int64_t>(std::llround(static_cast<double>(n) * 1e9 / rate)));
  }
};

struct Connection {
  int fd = -1;
  std::uint64_t next = 0;  // the schedule index of the next request this connection sends
  bool busy = false;
  // The request in flight.
  std::uint64_t n = 0;
  Clock::time_point intended, sent, first_byte;
  Clock::time_point done{};           // when the last response ended
  Clock::time_point previous_done{};  // when the one before the request in flight ended
  std::size_t written = 0;
  bool want_write = false;
  ResponseParser parser;
  std::string body;
};

class Worker {
 public:
  Worker(const Options& options, const sockaddr_in& address, const std::string& request, const Schedule& schedule,
         std::vector<int> connection_indexes)
      : o_(options), address_(address), request_(request), schedule_(schedule) {
    for (int c : connection_indexes) {
      Connection conn;
      conn.next = static_cast<std::uint64_t>(c);
      conns_.push_back(std::move(conn));
    }
    std::uint64_t expected = schedule.total / static_cast<std::uint64_t>(schedule.connections) + 1;
    for (auto* v : {&tally_.latency, &tally_.ttfb, &tally_.service, &tally_.send_lag}) {
      v->reserve(expected * conns_.size());
    }
  }

  // Connects every connection up front, so the schedule does not pay for it.
  void connect_all() {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) throw std::runtime_error(std::string("epoll_create1: ") + std::strerror(errno));
    for (std::size_t i = 0; i < conns_.size(); ++i) {
      if (!open(i)) throw std::runtime_error(std::string("connect: ") + std::strerror(errno));
    }
  }

  void run() {
    auto hard_deadline = schedule_.due(schedule_.total) + o_.timeout + std::chrono::seconds(1);
    std::vector<epoll_event> events(conns_.size());
    std::vector<char> buffer(64 * 1024);
    for (;;) {
      auto now = Clock::now();
      bool all_done = true;
      auto wake = Clock::time_point::max();
      for (std::size_t i = 0; i < conns_.size(); ++i) {
        auto& c = conns_[i];
        if (c.busy && now - c.sent > o_.timeout) {
          fail(i, tally_.errors_timeout);
        }
        if (!c.busy && c.next < schedule_.total) {
          auto due = schedule_.due(c.next);
          if (due <= now) send(i, due);
        }
        if (c.busy) {
          wake = std::min(wake, c.sent + o_.timeout);
        } else if (c.next < schedule_.total) {
          // Also when a failed connect left the next request already due: then the wait is zero.
          wake = std::min(wake, schedule_.due(c.next));
        }
        if (c.busy || c.next < schedule_.total) all_done = false;
      }
      if (all_done) break;
      if (now > hard_deadline) {
        give_up();
        break;
      }
      timespec timeout{0, 0};
      if (wake != Clock::time_point::max() && wake > now) {
        auto wait = std::chrono::duration_cast<Nanos>(wake - now).count();
        timeout.tv_sec = static_cast<time_t>(wait / 1'000'000'000);
        timeout.tv_nsec = static_cast<long>(wait % 1'000'000'000);
      } else if (wake == Clock::time_point::max()) {
        timeout.tv_sec = 1;
      }
      int ready = epoll_pwait2(epoll_, events.data(), static_cast<int>(events.size()), &timeout, nullptr);
      if (ready < 0) {
        if (errno == EINTR) continue;
        throw std::runtime_error(std::string("epoll_pwait2: ") + std::strerror(errno));
      }
      for (int e = 0; e < ready; ++e) {
        auto i = static_cast<std::size_t>(events[e].data.u64);
        if (conns_[i].fd < 0) continue;
        if (events[e].events & EPOLLOUT) write_more(i);
        if (conns_[i].fd >= 0 && (events[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
          read_some(i, buffer);
        }
      }
    }
    for (auto& c : conns_) {
      if (c.fd >= 0) ::close(c.fd);
    }
    ::close(epoll_);
  }

  const Tally& tally() const { return tally_; }

 private:
  bool measured(std::uint64_t n) const { return n >= schedule_.first_measured; }

  bool open(std::size_t i) {
    auto& c = conns_[i];
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // A blocking connect: loopback answers at once, and a reconnect's cost
    // belongs to the request that needed it.
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&address_), sizeof address_) != 0) {
      int saved = errno;
      ::close(fd);
      errno = saved;
      return false;
    }
    int flags = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    ::epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &ev);
    c.fd = fd;
    c.want_write = false;
    return true;
  }

  void close_connection(std::size_t i) {
    auto& c = conns_[i];
    if (c.fd < 0) return;
    ::epoll_ctl(epoll_, EPOLL_CTL_DEL, c.fd, nullptr);
    ::close(c.fd);
    c.fd = -1;
  }

  void send(std::size_t i, Clock::time_point due) {
    auto& c = conns_[i];
    c.n = c.next;
    c.next += static_cast<std::uint64_t>(schedule_.connections);
    if (measured(c.n)) ++tally_.scheduled;
    c.intended = due;
    if (c.fd < 0) {
      ++tally_.reconnects;
      if (!open(i)) {
        if (measured(c.n)) ++tally_.errors_connect;
        return;
      }
    }
    c.busy = true;
    c.sent = Clock::now();
    c.previous_done = c.done;
    c.written = 0;
    c.parser.reset();
    c.body.clear();
    write_more(i);
  }

  void write_more(std::size_t i) {
    auto& c = conns_[i];
    if (!c.busy) return;
    while (c.written < request_.size()) {
      ssize_t n = ::send(c.fd, request_.data() + c.written, request_.size() - c.written, MSG_NOSIGNAL);
      if (n > 0) {
        c.written += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      fail(i, tally_.errors_io);
      return;
    }
    bool want_write = c.written < request_.size();
    if (want_write != c.want_write) {
      epoll_event ev{};
      ev.events = EPOLLIN | (want_write ? EPOLLOUT : 0u);
      ev.data.u64 = i;
      ::epoll_ctl(epoll_, EPOLL_CTL_MOD, c.fd, &ev);
      c.want_write = want_write;
    }
  }

  void read_some(std::size_t i, std::vector<char>& buffer) {
    auto& c = conns_[i];
    ssize_t n = ::recv(c.fd, buffer.data(), buffer.size(), 0);
    auto now = Clock::now();
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) {
      if (!c.busy) {
        // The server closed an idle keep-alive connection; the next send reconnects.
        close_connection(i);
      } else if (n == 0 && c.parser.eof() == ResponseParser::Result::done) {
        complete(i, now);
      } else {
        fail(i, tally_.errors_io);
      }
      return;
    }
    if (!c.busy) {
      fail(i, tally_.errors_protocol);  // bytes nobody asked for
      return;
    }
    bool had_body = c.parser.body_started();
    auto result = c.parser.feed(std::string_view(buffer.data(), static_cast<std::size_t>(n)),
                                o_.expect.empty() ? nullptr : &c.body);
    if (!had_body && c.parser.body_started()) c.first_byte = now;
    if (result == ResponseParser::Result::bad) {
      fail(i, tally_.errors_protocol);
    } else if (result == ResponseParser::Result::done) {
      complete(i, now);
    }
  }

  void complete(std::size_t i, Clock::time_point now) {
    auto& c = conns_[i];
    c.busy = false;
    c.done = now;
    // A bodiless answer's first byte is its end.
    if (!c.parser.body_started()) c.first_byte = now;
    int status = c.parser.status();
    if (c.parser.close()) close_connection(i);
    if (!measured(c.n)) return;
    bool ok = status >= 200 && status <= 299;
    if (ok && !o_.expect.empty() && c.body.find(o_.expect) == std::string::npos) {
      ++tally_.errors_body;
      return;
    }
    ++tally_.statuses[status];
    tally_.latency.push_back((now - c.intended).count());
    tally_.ttfb.push_back((c.first_byte - c.intended).count());
    tally_.service.push_back((now - c.sent).count());
    if (c.previous_done <= c.intended) {
      tally_.send_lag.push_back((c.sent - c.intended).count());
    } else {
      ++tally_.queued;
    }
    tally_.last_completion = now;
  }

  void fail(std::size_t i, std::uint64_t& counter) {
    auto& c = conns_[i];
    if (c.busy && measured(c.n)) ++counter;
    c.busy = false;
    c.done = Clock::now();
    close_connection(i);
  }

  // Past the hard deadline whatever is in flight or still scheduled is lost.
  void give_up() {
    for (auto& c : conns_) {
      if (c.busy && measured(c.n)) ++tally_.unfinished;
      for (std::uint64_t n = c.next; n < schedule_.total; n += static_cast<std::uint64_t>(schedule_.connections)) {
        if (measured(n)) {
          ++tally_.unfinished;
          ++tally_.scheduled;
        }
      }
      c.busy = false;
      c.next = schedule_.total;
    }
  }

  const Options& o_;
  sockaddr_in address_;
  const std::string& request_;
  const Schedule& schedule_;
  std::vector<Connection> conns_;
  int epoll_ = -1;
  Tally tally_;
};

sockaddr_in resolve(const Options& o) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  int rc = ::getaddrinfo(o.host.c_str(), nullptr, &hints, &found);
  if (rc != 0 || !found) throw std::runtime_error("cannot resolve " + o.host + ": " + gai_strerror(rc));
  sockaddr_in address = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
  ::freeaddrinfo(found);
  address.sin_port = htons(o.port);
  return address;
}

// Nearest-rank percentile of sorted nanoseconds, in milliseconds.
double percentile_ms(const std::vector<std::int64_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return static_cast<double>(sorted[std::clamp<std::size_t>(rank, 1, sorted.size()) - 1]) / 1e6;
}

void print_row(const char* name, std::vector<std::int64_t>& samples) {
  std::sort(samples.begin(), samples.end());
  std::printf("%-9s", name);
  for (double p : {50.0, 90.0, 99.0, 99.9, 100.0}) std::printf(" %9.3f", percentile_ms(samples, p));
  std::printf("\n");
}

double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_options(argc, argv);
  // The default 50 µs timer slack would add up to that much to every wake-up,
  // and so to every measured latency.
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

  std::string request = build_request(o);
  sockaddr_in address{};
  try {
    address = resolve(o);
  } catch (const std::exception& e) {
    std::cerr << "tollgate_fixed_rate: " << e.what() << "\n";
    return 1;
  }

  Schedule schedule;
  schedule.rate = o.rate;
  schedule.connections = o.connections;
  schedule.first_measured =
      static_cast<std::uint64_t>(std::llround(o.rate * std::chrono::duration<double>(o.warmup).count()));
  schedule.total = schedule.first_measured +
                   static_cast<std::uint64_t>(std::llround(o.rate * std::chrono::duration<double>(o.duration).count()));

  std::vector<Worker> workers;
  workers.reserve(static_cast<std::size_t>(o.threads));
  for (int t = 0; t < o.threads; ++t) {
    std::vector<int> mine;
    for (int c = t; c < o.connections; c += o.threads) mine.push_back(c);
    workers.emplace_back(o, address, request, schedule, std::move(mine));
  }
  try {
    for (auto& w : workers) w.connect_all();
  } catch (const std::exception& e) {
    std::cerr << "tollgate_fixed_rate: " << e.what() << "\n";
    return 1;
  }

  double cpu_before = cpu_seconds();
  schedule.start = Clock::now() + std::chrono::milliseconds(20);
  std::vector<std::thread> threads;
  std::vector<std::string> failures(workers.size());
  for (std::size_t t = 0; t < workers.size(); ++t) {
    threads.emplace_back([&, t] {
      try {
        workers[t].run();
      } catch (const std::exception& e) {
        failures[t] = e.what();
      }
    });
  }
  for (auto& th : threads) th.join();
  double cpu_used = cpu_seconds() - cpu_before;
  for (const auto& f : failures) {
    if (!f.empty()) {
      std::cerr << "tollgate_fixed_rate: " << f << "\n";
      return 1;
    }
  }

  Tally all;
  for (const auto& w : workers) all.merge(w.tally());
  auto measured_start = schedule.due(schedule.first_measured);
  double window = std::chrono::duration<double>(all.last_completion - measured_start).count();
  double achieved = window > 0 ? static_cast<double>(all.latency.size()) / window : 0;
  double measured_seconds = std::chrono::duration<double>(o.duration).count();
  std::uint64_t errors =
      all.errors_connect + all.errors_io + all.errors_timeout + all.errors_protocol + all.errors_body + all.unfinished;
  std::uint64_t non2xx = 0;
  for (auto [status, n] : all.statuses) {
    if (status < 200 || status > 299) non2xx += n;
  }

  std::printf("target    %s %s:%u%s, %.0f req/s for %.1f s (+%.1f s warmup), %d connections, %d threads\n",
              o.method.c_str(), o.host.c_str(), o.port, o.path.c_str(), o.rate, measured_seconds,
              std::chrono::duration<double>(o.warmup).count(), o.connections, o.threads);
  std::printf("requests  scheduled %llu completed %zu errors %llu non-2xx %llu reconnects %llu queued %llu\n",
              static_cast<unsigned long long>(all.scheduled), all.latency.size(),
              static_cast<unsigned long long>(errors), static_cast<unsigned long long>(non2xx),
              static_cast<unsigned long long>(all.reconnects), static_cast<unsigned long long>(all.queued));
  if (errors > 0) {
    std::printf("errors    connect %llu io %llu timeout %llu protocol %llu body %llu unfinished %llu\n",
                static_cast<unsigned long long>(all.errors_connect), static_cast<unsigned long long>(all.errors_io),
                static_cast<unsigned long long>(all.errors_timeout),
                static_cast<unsigned long long>(all.errors_protocol), static_cast<unsigned long long>(all.errors_body),
                static_cast<unsigned long long>(all.unfinished));
  }
  std::printf("status   ");
  for (auto [status, n] : all.statuses) std::printf(" %d:%llu", status, static_cast<unsigned long long>(n));
  std::printf("\n");
  std::printf("rate      target %.1f achieved %.1f req/s\n", o.rate, achieved);
  std::printf("cpu       %.1f%% of one core (the generator itself, warmup included)\n",
              100.0 * cpu_used / std::chrono::duration<double>(o.duration + o.warmup).count());
  std::printf("ms              p50       p90       p99     p99.9       max\n");
  print_row("latency", all.latency);
  print_row("ttfb", all.ttfb);
  print_row("service", all.service);
  print_row("send_lag", all.send_lag);
  return errors > 0 ? 1 : 0;
}
