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

bool EventQueue::when_drained(std::size_t limit, std::function<void()> wake) {
  std::lock_guard lock(mutex_);
  if (events_.size() <= limit) return false;
  // next() takes every event, so any limit is met at the next take.
  drained_ = std::move(wake);
  return true;
}

boost::asio::awaitable<std::deque<backends::CompletionEvent>> EventQueue::next() {
  for (;;) {
    std::deque<backends::CompletionEvent> events;
    std::function<void()> drained;
    {
      std::lock_guard lock(mutex_);
      events = std::exchange(events_, {});
      drained = std::exchange(drained_, {});
    }
    if (drained) drained();  // outside the lock: it posts to the producer
    if (!events.empty()) co_return events;
    co_await signal_.async_receive(boost::asio::use_awaitable);
  }
}

}  // namespace tollgate::gateway
