// The upstream connection pool: an acquire that waits for a full pool is
// woken, never polled, when a connection comes back or closes, or when its
// caller cancels it. Single-threaded on a test io_context, so each wait is
// reached for certain before the step that should end it.
#include "backends/http_client.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>

using namespace tollgate::backends;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using SteadyClock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

// One acquire's inputs and outcome.
struct Acquire {
  explicit Acquire(net::io_context& ioc) : wait(ioc) {}
  std::atomic<bool> cancelled{false};
  net::steady_timer wait;
  ConnectFailure failure;
  std::unique_ptr<UpstreamConnection> connection;
  bool finished = false;
};

net::awaitable<void> run_acquire(HttpClient* client, Acquire* a) {
  // Far past the test's bounded runs: only a wake-up ends the wait in time.
  auto deadline = SteadyClock::now() + 60s;
  a->connection = co_await client->acquire(deadline, a->cancelled, a->wait, a->failure);
  a->finished = true;
}

void start(net::io_context& ioc, HttpClient& client, Acquire& a) {
  net::co_spawn(ioc, run_acquire(&client, &a), net::detached);
}

// Runs what is ready, so a new acquire reaches its wait. (A context that ran
// out of work stops until restarted.)
void run_ready(net::io_context& ioc) {
  ioc.restart();
  ioc.poll();
}

// Runs the context until `a` has finished, for at most ten seconds.
bool run_until_finished(net::io_context& ioc, const Acquire& a) {
  ioc.restart();
  auto bound = SteadyClock::now() + 10s;
  while (!a.finished && SteadyClock::now() < bound) ioc.run_one_for(10ms);
  return a.finished;
}

}  // namespace

TEST_CASE("an acquire waiting for a full pool wakes when a connection comes back, closes, or is cancelled",
          "[backends][http_client]") {
  net::io_context ioc;
  // Connections complete in the listen backlog; nothing needs to accept them.
  tcp::acceptor listener(ioc, {net::ip::make_address("127.0.0.1"), 0});
  std::string error;
  auto origin = parse_base_url("http://127.0.0.1:" + std::to_string(listener.local_endpoint().port()), error);
  REQUIRE(origin);
  HttpClientOptions options;
  options.max_connections = 1;
  HttpClient client(ioc, *origin, options);

  Acquire first(ioc);
  start(ioc, client, first);
  REQUIRE(run_until_finished(ioc, first));
  REQUIRE(first.connection);

  // The pool is full: the next acquire waits until the connection comes back.
  Acquire second(ioc);
  start(ioc, client, second);
  run_ready(ioc);
  REQUIRE_FALSE(second.finished);
  client.release(std::move(first.connection));
  REQUIRE(run_until_finished(ioc, second));
  REQUIRE(second.connection);
  CHECK(second.connection->reused);

  // ... or until it closes.
  Acquire third(ioc);
  start(ioc, client, third);
  run_ready(ioc);
  REQUIRE_FALSE(third.finished);
  second.connection.reset();
  REQUIRE(run_until_finished(ioc, third));
  REQUIRE(third.connection);
  CHECK_FALSE(third.connection->reused);

  // ... or until its caller cancels it.
  Acquire fourth(ioc);
  start(ioc, client, fourth);
  run_ready(ioc);
  REQUIRE_FALSE(fourth.finished);
  fourth.cancelled = true;
  fourth.wait.cancel();
  REQUIRE(run_until_finished(ioc, fourth));
  CHECK_FALSE(fourth.connection);
  CHECK(fourth.failure.cancelled);
}
