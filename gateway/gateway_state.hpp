// What one gateway process holds while it serves, shared by its sessions.
// Internal to the gateway's sources: Asio and Beast stay out of public headers.
#pragma once

#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "backends/router.hpp"
#include "gateway/auth.hpp"
#include "gateway/config.hpp"
#include "gateway/event_queue.hpp"
#include "gateway/gateway_metrics.hpp"
#include "gateway/jobs.hpp"
#include "gateway/proxy/app_upstream.hpp"
#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "metering/usage_writer.hpp"

namespace tollgate::gateway {

// A connection the shutdown can reach: idle ones are closed at once, busy ones
// finish their request first.
struct Connection {
  explicit Connection(boost::asio::ip::tcp::socket socket) : stream(std::move(socket)) {}
  boost::beast::tcp_stream stream;
  std::atomic<bool> idle{true};
  // The completion being relayed, if any; touched on the connection's executor only.
  std::weak_ptr<EventQueue> events;
};

// What one process serves: configuration, routing, keys, quotas, metering.
struct Gateway {
  Config config;
  GatewayMetrics metrics;
  backends::Router router;
  std::unique_ptr<KeyCache> keys;
  AdminKey admin_key;
  std::unique_ptr<metering::Store> admin_store;  // blocking: used on admin_pool only
  boost::asio::thread_pool admin_pool{1};
  // Rendering and tokenising long prompts: never on an io thread.
  boost::asio::thread_pool prepare_pool{std::max(1u, std::thread::hardware_concurrency())};
  metering::QuotaLimiter quotas;
  // Claims from shared quota budgets wait on the database: never on an io thread.
  boost::asio::thread_pool quota_pool{1};
  std::unique_ptr<metering::UsageWriter> usage;
  std::atomic<bool> stopping{false};
  std::atomic<bool> cut_off{false};         // the shutdown grace has run out: no more fallbacks
  std::unique_ptr<proxy::AppUpstream> app;  // set when app_upstream is configured
  std::vector<boost::asio::ip::address> trusted_proxies;
  std::atomic<std::size_t> open_connections{0};

  std::mutex connections_mutex;
  std::list<std::weak_ptr<Connection>> connections;
  std::string all_models_body;  // /v1/models for a key that may use every model
  std::unique_ptr<JobManager> jobs;  // the /v2 job API; set once the io contexts exist

  // The models' "created": when this gateway started serving them (Unix seconds).
  const std::int64_t started_s = metering::now_ms() / 1000;

  explicit Gateway(const Config& c) : config(c), metrics(c.metering.per_user_metrics) {}
};

// Coroutines take their state as parameters, never as lambda captures: g++ 12
// destroys a capturing coroutine lambda's captures twice.
template <class F>
boost::asio::awaitable<std::invoke_result_t<F>> invoke(F f) {
  co_return f();
}

// Runs `f` on `pool` and resumes on the caller's executor.
template <class F>
boost::asio::awaitable<std::invoke_result_t<F>> run_on(boost::asio::thread_pool& pool, F f) {
  co_return co_await boost::asio::co_spawn(pool, invoke(std::move(f)), boost::asio::use_awaitable);
}

// Runs `f` on the admin pool (SQLite may block) and resumes on the caller's executor.
template <class F>
boost::asio::awaitable<std::invoke_result_t<F>> run_blocking(Gateway& gw, F f) {
  co_return co_await run_on(gw.admin_pool, std::move(f));
}

// The /v1/models answer: every routed model, or those in `allowed` when it is not empty.
std::string model_list_body(const backends::Router& router, const std::vector<std::string>& allowed,
                            std::int64_t created);

}  // namespace tollgate::gateway
