// Backend events on their way to one consumer coroutine: producers call
// on_event from any thread; the consumer takes everything queued at once, and
// a producer paused for it (when_drained) is woken when it does.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <deque>
#include <functional>
#include <mutex>

#include "backends/backend.hpp"

namespace tollgate::gateway {

class EventQueue final : public backends::CompletionSink {
 public:
  explicit EventQueue(boost::asio::any_io_executor ex) : signal_(ex, 1) {}

  void on_event(backends::CompletionEvent event) override;
  bool when_drained(std::size_t limit, std::function<void()> wake) override;

  // Every event queued so far, waiting for at least one.
  boost::asio::awaitable<std::deque<backends::CompletionEvent>> next();

 private:
  std::mutex mutex_;
  std::deque<backends::CompletionEvent> events_;
  std::function<void()> drained_;  // set while the producer waits for room
  boost::asio::experimental::concurrent_channel<void(boost::system::error_code)> signal_;
};

}  // namespace tollgate::gateway
