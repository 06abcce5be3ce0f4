// Backpressure in the OpenAI-compatible backend: a streamed read paused for a
// slow client resumes when the client drains, and a cancel ends the pause.
// The reader never polls, so without the wake-ups these tests hang until
// their bounded waits fail.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "backends/openai_compatible.hpp"

using namespace tollgate::backends;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

namespace {

constexpr auto as_tuple = net::as_tuple(net::use_awaitable);
// Far longer than any step below takes; a missing wake-up runs into it.
constexpr auto kBound = 10s;

std::string chunk(const std::string& data) {
  std::ostringstream hex;
  hex << std::hex << data.size();
  return hex.str() + "\r\n" + data + "\r\n";
}

std::string delta_event(int i) {
  return "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"" + std::to_string(i) + " \"}}]}\n\n";
}

// A streaming upstream on a loopback port. Each answer sends `first` deltas,
// then, once released, `rest` more and its end; it then waits for the
// gateway to close the connection.
class StreamingUpstream {
 public:
  StreamingUpstream(int first, int rest)
      : first_(first), rest_(rest), acceptor_(ioc_, {net::ip::make_address("127.0.0.1"), 0}), released_(ioc_) {
    released_.expires_at(std::chrono::steady_clock::time_point::max());
    net::co_spawn(ioc_, accept_loop(this), net::detached);
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~StreamingUpstream() {
    ioc_.stop();
    thread_.join();
  }

  std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port()) + "/v1";
  }
  // Lets every answer, current and later, send the rest.
  void release() {
    net::post(ioc_, [this] {
      is_released_ = true;
      released_.cancel();
    });
  }

 private:
  static net::awaitable<void> accept_loop(StreamingUpstream* self) {
    for (;;) {
      auto [ec, socket] = co_await self->acceptor_.async_accept(as_tuple);
      if (ec) co_return;
      net::co_spawn(self->ioc_, answer(self, std::move(socket)), net::detached);
    }
  }

  static net::awaitable<void> answer(StreamingUpstream* self, tcp::socket socket) {
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    auto [read_ec, read_n] = co_await http::async_read(socket, buffer, request, as_tuple);
    if (read_ec) co_return;
    std::string head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    std::string first;
    for (int i = 0; i < self->first_; ++i) first += delta_event(i);
    head += chunk(first);
    auto [head_ec, head_n] = co_await net::async_write(socket, net::buffer(head), as_tuple);
    if (head_ec) co_return;
    if (!self->is_released_) co_await self->released_.async_wait(as_tuple);
    std::string rest;
    for (int i = self->first_; i < self->first_ + self->rest_; ++i) rest += delta_event(i);
    rest += "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    rest += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":" +
            std::to_string(self->first_ + self->rest_) + "}}\n\ndata: [DONE]\n\n";
    std::string tail = chunk(rest) + "0\r\n\r\n";
    auto [tail_ec, tail_n] = co_await net::async_write(socket, net::buffer(tail), as_tuple);
    if (tail_ec) co_return;
    char byte;
    co_await socket.async_read_some(net::buffer(&byte, 1), as_tuple);
  }

  int first_;
  int rest_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  net::steady_timer released_;
  bool is_released_ = false;  // upstream thread only
  std::thread thread_;
};

// A client that reads only when told: it holds what arrives, and keeps the
// producer's wake-up until it drains.
class HeldSink final : public CompletionSink {
 public:
  void on_event(CompletionEvent event) override {
    std::lock_guard lock(mutex_);
    if (event.type == CompletionEvent::Type::delta) {
      text_ += event.text;
      ++held_;
    } else {
      final_ = std::move(event);
    }
    changed_.notify_all();
  }

  bool when_drained(std::size_t limit, std::function<void()> wake) override {
    std::lock_guard lock(mutex_);
    if (held_ <= limit) return false;
    wake_ = std::move(wake);
    ++pauses_;
    changed_.notify_all();
    return true;
  }

  // Waits until the producer pauses or finishes; false when neither happens in time.
  bool wait_paused_or_final() {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, kBound, [this] { return wake_ || final_; });
  }
  bool wait_final() {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, kBound, [this] { return final_.has_value(); });
  }

  // Takes everything held, then wakes the producer (outside the lock, as a real consumer does).
  void drain() {
    std::function<void()> wake;
    {
      std::lock_guard lock(mutex_);
      held_ = 0;
      wake = std::exchange(wake_, {});
    }
    if (wake) wake();
  }

  bool paused() {
    std::lock_guard lock(mutex_);
    return static_cast<bool>(wake_);
  }
  std::size_t held() {
    std::lock_guard lock(mutex_);
    return held_;
  }
  int pauses() {
    std::lock_guard lock(mutex_);
    return pauses_;
  }
  std::string text() {
    std::lock_guard lock(mutex_);
    return text_;
  }
  std::optional<CompletionEvent> final_event() {
    std::lock_guard lock(mutex_);
    return final_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::string text_;
  std::size_t held_ = 0;
  std::function<void()> wake_;
  int pauses_ = 0;
  std::optional<CompletionEvent> final_;
};

OpenAICompatibleConfig config_for(const StreamingUpstream& upstream) {
  OpenAICompatibleConfig c;
  c.name = "slow-client";
  c.base_url = upstream.base_url();
  c.max_pending_events = 4;
  c.max_connections = 1;
  c.connect_timeout = 60s;  // a pool slot held past kBound fails the test, not the call
  return c;
}

CompletionRequest stream_request() {
  CompletionRequest r;
  r.endpoint = Endpoint::chat_completions;
  r.model = "m";
  r.messages = {{"user", "hi"}};
  r.stream = true;
  return r;
}

// Drains whenever the producer pauses, until the answer ends; false when it stays paused.
bool drain_to_the_end(HeldSink& sink) {
  while (!sink.final_event()) {
    sink.drain();
    if (!sink.wait_paused_or_final()) return false;
  }
  return true;
}

std::string expected_text(int pieces) {
  std::string text;
  for (int i = 0; i < pieces; ++i) text += std::to_string(i) + " ";
  return text;
}

}  // namespace

TEST_CASE("a read paused for a slow client resumes when the client drains", "[backends][openai][backpressure]") {
  StreamingUpstream upstream(10, 300);
  auto backend = make_openai_compatible_backend(config_for(upstream));
  auto sink = std::make_shared<HeldSink>();
  auto handle = backend->start(stream_request(), sink);

  // The first ten pieces are more than the sink holds unpaused; the rest waits for the release.
  REQUIRE(sink->wait_paused_or_final());
  REQUIRE(sink->paused());
  CHECK(sink->held() > 4);
  CHECK(sink->held() <= 10);
  upstream.release();
  // Each drain wakes the reader, which reads until it is over the limit again.
  REQUIRE(drain_to_the_end(*sink));
  auto done = *sink->final_event();
  CHECK(done.type == CompletionEvent::Type::done);
  CHECK(done.usage.completion_tokens == 310);
  CHECK(sink->text() == expected_text(310));
  CHECK(sink->pauses() >= 1);
}

TEST_CASE("a cancel wakes a read paused for a slow client", "[backends][openai][backpressure]") {
  StreamingUpstream upstream(10, 0);
  auto backend = make_openai_compatible_backend(config_for(upstream));
  auto paused_sink = std::make_shared<HeldSink>();
  auto paused = backend->start(stream_request(), paused_sink);
  REQUIRE(paused_sink->wait_paused_or_final());
  REQUIRE(paused_sink->paused());

  // The pool holds one connection: the next call gets it only once the
  // paused call has woken, seen the cancel and let its connection go.
  paused->cancel();
  upstream.release();
  auto next_sink = std::make_shared<HeldSink>();
  auto next = backend->start(stream_request(), next_sink);
  REQUIRE(next_sink->wait_paused_or_final());
  REQUIRE(drain_to_the_end(*next_sink));
  CHECK(next_sink->final_event()->type == CompletionEvent::Type::done);
  CHECK(next_sink->text() == expected_text(10));
  CHECK_FALSE(paused_sink->final_event());  // a cancelled call sends nothing more
  // Its connection is gone now: cancelling again touches nothing of it (ASan would see it).
  paused->cancel();
  next->cancel();
  auto last_sink = std::make_shared<HeldSink>();
  auto last = backend->start(stream_request(), last_sink);
  REQUIRE(drain_to_the_end(*last_sink));
  CHECK(last_sink->final_event()->type == CompletionEvent::Type::done);
}

TEST_CASE("a read paused for a client that never drains ends at the total timeout",
          "[backends][openai][backpressure]") {
  StreamingUpstream upstream(10, 0);
  auto config = config_for(upstream);
  config.total_timeout = 300ms;
  auto backend = make_openai_compatible_backend(config);
  auto sink = std::make_shared<HeldSink>();
  auto handle = backend->start(stream_request(), sink);
  REQUIRE(sink->wait_final());
  auto failed = *sink->final_event();
  CHECK(failed.type == CompletionEvent::Type::error);
  CHECK(failed.error.kind == ErrorKind::timeout);
  CHECK(failed.error.message == "the upstream call exceeded the total timeout");
  // The upstream's usage never came: estimated from the pieces received.
  CHECK(failed.usage.estimated);
  CHECK(failed.usage.completion_tokens == static_cast<std::int64_t>(sink->held()));
}
