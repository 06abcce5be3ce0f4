// IoDeadline on a real loopback socket pair: a read that outlives its deadline
// is cancelled and reported as a timeout; a deadline moved later or removed
// lets the read finish when the data comes.
#include "gateway/proxy/io_deadline.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <optional>

namespace net = boost::asio;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;
using tollgate::proxy::IoDeadline;

namespace {

struct SocketPair {
  net::io_context io;
  tcp::socket reader{io};
  tcp::socket writer{io};

  SocketPair() {
    tcp::acceptor acceptor(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
    writer.connect(acceptor.local_endpoint());
    acceptor.accept(reader);
  }

  // Sends one byte to the reader after `delay`.
  void send_after(net::steady_timer& timer, std::chrono::milliseconds delay) {
    timer.expires_after(delay);
    timer.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) net::write(writer, net::buffer("x", 1));
    });
  }
};

// Reads one byte from the pair's reader; what it completed with and when.
struct ReadResult {
  boost::beast::error_code ec;
  std::chrono::steady_clock::duration took{};
};

ReadResult read_one(SocketPair& pair, IoDeadline& deadline, const std::function<void()>& setup) {
  char byte = 0;
  std::optional<ReadResult> result;
  const auto started = std::chrono::steady_clock::now();
  setup();
  net::async_read(pair.reader, net::buffer(&byte, 1), [&](const boost::system::error_code& ec, std::size_t) {
    result = ReadResult{deadline.outcome(ec), std::chrono::steady_clock::now() - started};
  });
  // Bounded: every case ends within a second or two.
  pair.io.run_for(5s);
  REQUIRE(result);
  return *result;
}

}  // namespace

TEST_CASE("a read past its deadline is cancelled and reported as a timeout", "[proxy][io_deadline]") {
  SocketPair pair;
  IoDeadline deadline(pair.io.get_executor(), pair.reader);
  auto r = read_one(pair, deadline, [&] { deadline.arm(50ms); });
  CHECK(r.ec == boost::beast::error::timeout);
  CHECK(r.took >= 50ms);
  CHECK(r.took < 2s);
}

TEST_CASE("a deadline moved earlier takes effect at once", "[proxy][io_deadline]") {
  SocketPair pair;
  IoDeadline deadline(pair.io.get_executor(), pair.reader);
  auto r = read_one(pair, deadline, [&] {
    deadline.arm(1h);
    deadline.arm(50ms);
  });
  CHECK(r.ec == boost::beast::error::timeout);
  CHECK(r.took < 2s);
}

TEST_CASE("a deadline moved later, or removed, lets the read finish", "[proxy][io_deadline]") {
  SocketPair pair;
  IoDeadline deadline(pair.io.get_executor(), pair.reader);
  net::steady_timer sender(pair.io);
  SECTION("moved later") {
    auto r = read_one(pair, deadline, [&] {
      deadline.arm(50ms);
      deadline.arm(1500ms);
      pair.send_after(sender, 300ms);
    });
    CHECK_FALSE(r.ec);
    CHECK(r.took >= 300ms);
  }
  SECTION("removed") {
    auto r = read_one(pair, deadline, [&] {
      deadline.arm(50ms);
      deadline.disarm();
      pair.send_after(sender, 300ms);
    });
    CHECK_FALSE(r.ec);
  }
  SECTION("a deadline that fired does not outlive the next arm") {
    auto first = read_one(pair, deadline, [&] { deadline.arm(30ms); });
    REQUIRE(first.ec == boost::beast::error::timeout);
    pair.io.restart();
    auto second = read_one(pair, deadline, [&] {
      deadline.arm(1500ms);
      pair.send_after(sender, 100ms);
    });
    CHECK_FALSE(second.ec);
  }
}

TEST_CASE("an IoDeadline destroyed with a wait pending leaves the socket alone", "[proxy][io_deadline]") {
  SocketPair pair;
  {
    IoDeadline deadline(pair.io.get_executor(), pair.reader);
    deadline.arm(20ms);
  }
  net::steady_timer sender(pair.io);
  char byte = 0;
  boost::system::error_code read_ec = net::error::would_block;
  pair.send_after(sender, 100ms);
  net::async_read(pair.reader, net::buffer(&byte, 1),
                  [&](const boost::system::error_code& ec, std::size_t) { read_ec = ec; });
  pair.io.run_for(5s);
  CHECK_FALSE(read_ec);
  CHECK(byte == 'x');
}
