// Backend events on their way to one consumer coroutine: producers call
// on_event from any thread; the consumer takes everything queued at once.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <deque>
#include <mutex>

#include "backends/backend.hpp"

namespace tollgate::gateway {

class EventQueue final : public backends::CompletionSink {
 public:
  explicit EventQueue(boost::asio::any_io_executor ex) : signal_(ex, 1) {}

  void on_event(backends::CompletionEvent event) override;
  std::size_t pending() const override;

  // Every event queued so far, waiting for at least one.
  boost::asio::awaitable<std::deque<backends::CompletionEvent>> next();

 private:
  mutable std::mutex mutex_;
  std::deque<backends::CompletionEvent> events_;
  boost::asio::experimental::concurrent_channel<void(boost::system::error_code)> signal_;
};

}  // namespace tollgate::gateway
