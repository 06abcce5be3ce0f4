// The gateway's small routes: health, readiness, metrics, the model list and the admin API.
#include <boost/url/pct_string_view.hpp>

#include "gateway/admin.hpp"
#include "gateway/session.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace http = boost::beast::http;
using boost::asio::awaitable;

// /readyz's answer while serving: whether the database answers, and if not,
// why and since when. The replica stays ready either way: cached keys, unlimited
// keys and leases keep serving (docs/quotas.md), and a database outage would
// otherwise take every replica out of rotation at once.
std::string readiness_body(Gateway& gw) {
  const auto keys = gw.keys->store_reach();
  const auto budgets = gw.quotas.store_health();
  if (keys.ok && budgets.reachable) return R"({"status":"ok","database":"ok"})";
  const std::string error = keys.ok ? budgets.error : keys.error;
  const metering::EpochMs since = keys.ok             ? budgets.unreachable_since
                                  : budgets.reachable ? keys.since
                                                      : std::min(keys.since, budgets.unreachable_since);
  const std::string_view limited_keys = !budgets.shared                      ? "served"
                                        : gw.config.metering.quota_fail_open ? "admitted past their leases"
                                                                             : "refused past their leases";
  return boost::json::serialize(
      boost::json::object{{"status", "degraded"},
                          {"database", "unreachable"},
                          {"error", metering::excerpt(error, 300)},
                          {"unreachable_for_s", std::max<std::int64_t>(0, (metering::now_ms() - since) / 1000)},
                          {"limited_keys", limited_keys}});
}

}  // namespace

namespace {

boost::json::object model_object(std::string_view id, std::int64_t created) {
  return {{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "tollgate"}};
}

bool may_use(const std::vector<std::string>& allowed, std::string_view model) {
  return allowed.empty() || std::find(allowed.begin(), allowed.end(), model) != allowed.end();
}

}  // namespace

std::string model_list_body(const backends::Router& router, const std::vector<std::string>& allowed,
                            std::int64_t created) {
  boost::json::array data;
  for (const auto& route : router.routes()) {
    if (may_use(allowed, route.model)) data.push_back(model_object(route.model, created));
  }
  return boost::json::serialize(boost::json::object{{"object", "list"}, {"data", std::move(data)}});
}

awaitable<bool> Session::handle_status(const Request& req, Exchange& x, RouteHandler which) {
  Response res;
  if (which == RouteHandler::metrics) {
    gw_.metrics.metering_queue_depth.set(static_cast<double>(gw_.usage->queue_depth()));
    gw_.metrics.metering_spill_depth.set(static_cast<double>(gw_.usage->spill_depth()));
    res =
        make_response(req, http::status::ok, gw_.metrics.registry.render(), "text/plain; version=0.0.4; charset=utf-8");
  } else if (which == RouteHandler::readiness && gw_.stopping) {
    res = make_response(req, http::status::service_unavailable, R"({"status":"stopping"})");
  } else if (which == RouteHandler::readiness) {
    res = make_response(req, http::status::ok, readiness_body(gw_));
  } else {
    res = make_response(req, http::status::ok, R"({"status":"ok"})");
  }
  x.finish(res.result_int());
  co_return co_await write(std::move(res));
}

// GET /v1/models, and GET /v1/models/{id} (percent-decoded; a model this key
// may not use is as absent as one that does not exist).
awaitable<bool> Session::handle_models(const Request& req, Exchange& x, std::string_view path) {
  if (auto refused = co_await admit(x, 0)) {
    co_return co_await respond_error(req, x, *refused);
  }
  const auto& allowed = x.caller->key.models;
  std::string body;
  if (path == "/v1/models") {
    body = allowed.empty() ? gw_.all_models_body : model_list_body(gw_.router, allowed, gw_.started_s);
  } else {
    std::string id(path.substr(std::string_view("/v1/models/").size()));
    if (auto decoded = boost::urls::make_pct_string_view(id)) id = decoded->decode();
    x.event.model = id;
    const auto& routes = gw_.router.routes();
    const bool known = std::any_of(routes.begin(), routes.end(), [&](const auto& r) { return r.model == id; });
    if (!known || !may_use(allowed, id)) {
      auto missing = not_found("the model '" + metering::excerpt(id) + "' does not exist", "model_not_found");
      co_return co_await respond_error(req, x, missing);
    }
    body = boost::json::serialize(model_object(id, gw_.started_s));
  }
  auto res = make_response(req, http::status::ok, std::move(body));
  set_rate_limit_headers(res, x.admission->status);
  x.finish(200);
  co_return co_await write(std::move(res));
}

// Why a request may not use the admin API, if it may not.
std::optional<ApiError> Session::check_admin_key(const Request& req, Exchange& x) {
  auto key = presented_key(req[http::field::authorization], req["x-api-key"]);
  if (!key) return unauthorized("missing admin key", "missing_api_key");
  if (gw_.admin_key.matches(*key)) return std::nullopt;
  auto outcome = gw_.keys->authenticate(*key, metering::now_ms());
  if (outcome.status != AuthOutcome::Status::ok) return unauthorized("invalid admin key");
  x.identify(outcome.entry);
  gw_.metrics.auth_failures.labels({"not_admin"}).inc();
  return forbidden("this key is not the admin key", "admin_key_required");
}

// g++ 12 (with ASan) sees Asio's frame allocator through enough inlining here
// to call it a mismatch: the false positive completion_flow.cpp describes.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
awaitable<bool> Session::handle_admin_route(RequestParser& parser, Exchange& x) {
  auto& req = parser.get();
  if (auto refusal = check_admin_key(req, x)) co_return co_await refuse(parser, x, std::move(*refusal));
  if (!co_await read_body(parser, x)) co_return false;
  std::string method(req.method_string()), target(req.target()), body = req.body();
  // One hop to the pool: the call, then the key cache's refresh when it changed keys.
  auto admin_call = [this, method, target, body] {
    AdminResponse response;
    try {
      response = gateway::handle_admin(*gw_.admin_store, method, target, body, metering::now_ms());
    } catch (const std::exception& e) {
      response = {500, ApiError{500, e.what(), "server_error", std::nullopt, "internal_error", {}}.body()};
    }
    if (response.keys_changed) gw_.keys->refresh_if_changed();
    return response;
  };
  auto result = co_await run_blocking(gw_, std::move(admin_call));
  auto res = make_response(req, static_cast<http::status>(result.status), std::move(result.body));
  x.finish(result.status);
  co_return co_await write(std::move(res));
}
#pragma GCC diagnostic pop

}  // namespace tollgate::gateway
