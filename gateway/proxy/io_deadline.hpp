// A deadline for the operations on one socket, kept by a single timer that is
// re-armed only when it fires or when the deadline moves earlier. Setting it
// costs a clock read: beast::tcp_stream's expiry instead arms a timer and
// cancels it (a timerfd update and a handler through the scheduler) around
// every read and write, a tenth of the work of a proxied request.
//
// Use it with operations on the raw socket, never on a beast::tcp_stream with
// an expiry of its own. Asio types: only server.cpp and app_upstream.cpp.
#pragma once

#include <boost/asio/error.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/error.hpp>
#include <chrono>
#include <memory>

namespace tollgate::proxy {

class IoDeadline {
 public:
  using Clock = std::chrono::steady_clock;

  IoDeadline(const boost::asio::any_io_executor& ex, boost::asio::ip::tcp::socket& socket)
      : state_(std::make_shared<State>(ex, socket)) {}
  ~IoDeadline() { state_->stop(); }
  IoDeadline(const IoDeadline&) = delete;
  IoDeadline& operator=(const IoDeadline&) = delete;

  // The socket's pending and next operations must finish within `timeout`;
  // past it they are cancelled.
  void arm(Clock::duration timeout) { state_->arm(Clock::now() + timeout); }
  // No deadline until the next arm().
  void disarm() { state_->deadline = Clock::time_point::max(); }

  // `ec` as the caller should see it: an operation the deadline cancelled
  // timed out.
  boost::beast::error_code outcome(boost::beast::error_code ec) const {
    if (ec == boost::asio::error::operation_aborted && state_->fired) return boost::beast::error::timeout;
    return ec;
  }

 private:
  // Shared with the pending wait's handler, which may run after the owner is gone.
  struct State : std::enable_shared_from_this<State> {
    State(const boost::asio::any_io_executor& ex, boost::asio::ip::tcp::socket& s) : timer(ex), socket(&s) {}

    void arm(Clock::time_point at) {
      fired = false;
      deadline = at;
      // A later deadline is picked up when the armed wait fires.
      if (deadline < armed) wait_until(deadline);
    }

    void wait_until(Clock::time_point at) {
      armed = at;
      timer.expires_at(at);  // cancels a pending wait, whose handler then does nothing
      timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) { self->on_timer(ec); });
    }

    void on_timer(const boost::system::error_code& ec) {
      if (stopped || ec == boost::asio::error::operation_aborted) return;
      armed = Clock::time_point::max();
      if (deadline == Clock::time_point::max()) return;  // disarmed: the next arm() waits again
      if (Clock::now() < deadline) {
        wait_until(deadline);  // moved later since this wait began
        return;
      }
      fired = true;
      boost::system::error_code ignored;
      socket->cancel(ignored);
    }

    void stop() {
      stopped = true;
      timer.cancel();
    }

    boost::asio::steady_timer timer;
    boost::asio::ip::tcp::socket* socket;  // not used once stopped
    Clock::time_point deadline = Clock::time_point::max();
    Clock::time_point armed = Clock::time_point::max();  // when the pending wait ends; max: none pending
    bool fired = false;
    bool stopped = false;
  };

  std::shared_ptr<State> state_;
};

}  // namespace tollgate::proxy
