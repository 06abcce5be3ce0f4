#include "gateway/event_queue.hpp"

#include <boost/asio/use_awaitable.hpp>
#include <utility>

namespace tollgate::gateway {

void EventQueue::on_event(backends::CompletionEvent event) {
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(event));
  }
  // A failed try_send means a wake-up is already pending: nothing is lost.
  signal_.try_send(boost::system::error_code{});
}

std::size_t EventQueue::pending() const {
  std::lock_guard lock(mutex_);
  return events_.size();
}

boost::asio::awaitable<std::deque<backends::CompletionEvent>> EventQueue::next() {
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (!events_.empty()) co_return std::exchange(events_, {});
    }
    co_await signal_.async_receive(boost::asio::use_awaitable);
  }
}

}  // namespace tollgate::gateway
