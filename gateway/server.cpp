// The server: one io_context and acceptor per thread, sessions spawned per
// connection, and the SIGTERM drain. Requests are served by gateway/session.*.
#include "gateway/server.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <filesystem>
#include <iostream>
#include <thread>

#include "gateway/session.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
using tcp = net::ip::tcp;
using net::awaitable;
using net::use_awaitable;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(use_awaitable);

void log_session_error(std::exception_ptr e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    std::cerr << "tollgate: session failed: " << ex.what() << "\n";
  }
}

awaitable<void> run_session(Gateway& gw, std::shared_ptr<Connection> conn) {
  Session session(gw, std::move(conn));
  co_await session.run();
}

awaitable<void> accept_loop(Gateway& gw, tcp::acceptor& acceptor) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(as_tuple);
    if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;  // shutdown closed the acceptor
    if (ec) continue;  // e.g. EMFILE: the client retries; we keep serving the rest
    if (gw.open_connections.load() >= gw.config.limits.max_connections) {
      gw.metrics.rejected_connections.inc();
      beast::error_code ignored;
      socket.close(ignored);
      continue;
    }
    socket.set_option(tcp::no_delay(true), ec);
    auto conn = std::make_shared<Connection>(std::move(socket));
    {
      std::lock_guard lock(gw.connections_mutex);
      std::erase_if(gw.connections, [](const auto& w) { return w.expired(); });
      gw.connections.push_back(conn);
    }
    gw.open_connections.fetch_add(1);
    gw.metrics.open_connections.add(1);
    net::co_spawn(acceptor.get_executor(), run_session(gw, std::move(conn)), [&gw](std::exception_ptr e) {
      gw.open_connections.fetch_sub(1);
      gw.metrics.open_connections.add(-1);
      log_session_error(e);
    });
  }
}

// Waits for busy connections to finish, at most shutdown_grace, then stops every context.
awaitable<void> drain(Gateway& gw, std::vector<std::unique_ptr<net::io_context>>& contexts) {
  auto deadline = SteadyClock::now() + gw.config.limits.shutdown_grace;
  net::steady_timer timer(co_await net::this_coro::executor);
  auto busy = [&gw] { return gw.open_connections.load() > 0 || gw.jobs->running() > 0; };
  while (busy() && SteadyClock::now() < deadline) {
    timer.expires_after(std::chrono::milliseconds(20));
    co_await timer.async_wait(use_awaitable);
  }
  if (gw.jobs->running() > 0) {
    gw.cut_off = true;
    gw.jobs->cut_off();
  }
  if (gw.open_connections.load() > 0) {
    // Completions still running are told why they end: a stream gets an SSE
    // error event, an answer not yet begun a 503. They get a moment to say it.
    gw.cut_off = true;
    std::lock_guard lock(gw.connections_mutex);
    for (auto& weak : gw.connections) {
      auto conn = weak.lock();
      if (!conn) continue;
      net::post(conn->stream.get_executor(), [conn] {
        auto events = conn->events.lock();
        if (!events) return;
        backends::CompletionEvent ev;
        ev.type = backends::CompletionEvent::Type::error;
        ev.error = {backends::ErrorKind::overloaded, "the gateway is shutting down", 1};
        events->on_event(std::move(ev));
      });
    }
  }
  auto last_words = SteadyClock::now() + std::chrono::milliseconds(500);
  while (busy() && SteadyClock::now() < last_words) {
    timer.expires_after(std::chrono::milliseconds(20));
    co_await timer.async_wait(use_awaitable);
  }
  for (auto& c : contexts) c->stop();
}

// Where usage rows go while the database cannot take them (config.hpp's
// metering.spill_file). On PostgreSQL by default a file named after the listen
// port, so a replica that restarts finds what it left; on SQLite none.
std::string spill_file_for(const Config& config) {
  if (!config.metering.spill_file.empty()) return config.metering.spill_file;
  if (!metering::is_postgres_url(config.database)) return {};
  const std::string who =
      config.listen.port != 0 ? "port-" + std::to_string(config.listen.port) : "pid-" + std::to_string(::getpid());
  return (std::filesystem::temp_directory_path() / ("tollgate-usage-" + who + ".spill")).string();
}

}  // namespace

int run_server(const Config& config) {
  Gateway gw(config);
  gw.router = backends::Router({config.routing.cooldown_failures, config.routing.cooldown});
  for (const auto& b : config.backends) gw.router.add_backend(b.spec->make({gw.metrics.registry}));
  for (const auto& m : config.models) {
    backends::Route route{
        m.name, {}, m.least_busy ? backends::RoutingStrategy::least_busy : backends::RoutingStrategy::weighted};
    for (const auto& d : m.deployments) {
      backends::Deployment deployment;
      deployment.backend = gw.router.backend(d.backend);
      deployment.upstream_model = d.model;
      deployment.weight = d.weight;
      route.deployments.push_back(std::move(deployment));
    }
    gw.router.add_route(std::move(route));
  }

  gw.all_models_body = model_list_body(gw.router, {}, gw.started_s);

  // Opening the store migrates the schema before anything else touches it.
  gw.admin_store = metering::open_store(config.database);
  gw.admin_key = establish_admin_key(*gw.admin_store);
  if (gw.admin_key.created_plaintext) {
    std::cout << "tollgate: created the admin key (shown once, keep it): " << *gw.admin_key.created_plaintext
              << std::endl;
  }
  gw.keys = std::make_unique<KeyCache>(metering::open_store(config.database));
  gw.keys->start_refreshing(config.metering.key_refresh_interval);
  auto now = metering::now_ms();
  gw.quotas.restore(gw.admin_store->quota_state(now), now);
  if (metering::is_postgres_url(config.database)) {
    // Replicas on one database: limits are budgets they share (docs/quotas.md).
    gw.quotas.share_budgets(metering::open_store(config.database),
                            {config.metering.lease_idle_return, config.metering.quota_fail_open});
  }
  gw.usage = std::make_unique<metering::UsageWriter>(
      metering::open_store(config.database), config.metering.flush_interval, 4096,
      [&gw](std::size_t rows, std::chrono::microseconds took) {
        gw.metrics.metering_rows.inc(static_cast<double>(rows));
        gw.metrics.metering_flush_duration.observe(std::chrono::duration<double>(took).count());
      },
      config.metering.max_queued_rows, spill_file_for(config));

  int threads =
      config.io_threads > 0 ? config.io_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // One io_context per thread, each with its own SO_REUSEPORT acceptor: the
  // kernel spreads connections and no session ever crosses threads.
  std::vector<std::unique_ptr<net::io_context>> contexts;
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors;
  tcp::endpoint endpoint(net::ip::make_address(config.listen.host), config.listen.port);
  for (int i = 0; i < threads; ++i) {
    contexts.push_back(std::make_unique<net::io_context>(1));
    auto acceptor = std::make_unique<tcp::acceptor>(*contexts.back());
    acceptor->open(endpoint.protocol());
    acceptor->set_option(net::socket_base::reuse_address(true));
    acceptor->set_option(net::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>(true));
    acceptor->bind(endpoint);
    acceptor->listen(net::socket_base::max_listen_connections);
    endpoint = acceptor->local_endpoint();  // a port of 0 is now the real one, shared by the rest
    acceptors.push_back(std::move(acceptor));
  }
  if (config.app_upstream) {
    const auto& a = *config.app_upstream;
    proxy::AppUpstreamOptions options{a.host, a.port, a.connect_timeout, a.first_byte_timeout, a.idle_timeout};
    gw.app = std::make_unique<proxy::AppUpstream>(std::move(options));
    for (auto& c : contexts) gw.app->add_context(*c);
  }
  for (const auto& t : config.trusted_proxies) gw.trusted_proxies.push_back(net::ip::make_address(t));
  // Jobs run on the first context; what the last run left queued starts again.
  gw.jobs = std::make_unique<JobManager>(gw, contexts[0]->get_executor());
  gw.jobs->recover();
  for (int i = 0; i < threads; ++i) {
    net::co_spawn(*contexts[i], accept_loop(gw, *acceptors[i]), net::detached);
  }

  auto signals = std::make_unique<net::signal_set>(*contexts[0], SIGINT, SIGTERM);
  signals->async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    gw.stopping = true;
    gw.jobs->stop_starting();
    for (int i = 0; i < threads; ++i) {
      net::post(*contexts[i], [&, i] {
        beast::error_code ignored;
        acceptors[i]->close(ignored);
      });
    }
    {
      std::lock_guard lock(gw.connections_mutex);
      for (auto& weak : gw.connections) {
        auto conn = weak.lock();
        if (!conn) continue;
        net::post(conn->stream.get_executor(), [conn] {
          if (conn->idle) conn->stream.cancel();
        });
      }
    }
    // Busy connections finish their request; past the grace period the contexts stop.
    net::co_spawn(*contexts[0], drain(gw, contexts), net::detached);
  });

  std::cout << "tollgate: listening on http://" << (endpoint.address().is_v6() ? "[" : "")
            << endpoint.address().to_string() << (endpoint.address().is_v6() ? "]" : "") << ":" << endpoint.port()
            << std::endl;

  std::vector<std::thread> workers;
  for (int i = 1; i < threads; ++i) workers.emplace_back([&, i] { contexts[i]->run(); });
  contexts[0]->run();
  for (auto& w : workers) w.join();

  // Teardown order matters. Backends go first, dropping the sinks they hold
  // while the contexts still exist; then the contexts destroy the sessions cut
  // off by the grace period, whose requests are metered as they unwind; then
  // metering flushes.
  gw.prepare_pool.stop();  // a prompt being tokenised finishes before its backend goes
  gw.prepare_pool.join();
  gw.quota_pool.stop();  // a claim under way ends before the contexts it resumes on
  gw.quota_pool.join();
  gw.router = backends::Router();
  gw.app.reset();  // pooled app connections live on the contexts: closed first
  gw.jobs->release();
  signals.reset();
  acceptors.clear();
  contexts.clear();

  gw.quotas.stop_sharing();  // leases not used go back to the other replicas
  gw.usage->stop();
  auto stats = gw.usage->stats();
  std::cout << "tollgate: stopped; " << stats.written << " usage events written" << std::endl;
  return 0;
}

}  // namespace tollgate::gateway
