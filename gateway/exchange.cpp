#include "gateway/exchange.hpp"

#include <algorithm>
#include <string>

#include "gateway/gateway_state.hpp"

namespace tollgate::gateway {

Exchange::Exchange(Gateway& g, std::string_view label) : gw(g), route(label) {
  event.ts = metering::now_ms();
  event.route = std::string(route);
  gw.metrics.in_flight.add(1);
}

Exchange::~Exchange() {
  if (!finished) finish(500);
}

void Exchange::identify(std::shared_ptr<const KeyEntry> entry) {
  caller = std::move(entry);
  metered = true;
  event.user_id = caller->key.user_id;
  event.key_id = caller->key.id;
}

metering::QuotaSubject Exchange::subject() const {
  return {caller->key.user_id, caller->key.id, caller->user_limits, caller->key.limits};
}

void Exchange::finish(int status) {
  finished = true;
  auto& m = gw.metrics;
  m.in_flight.add(-1);
  auto took = std::chrono::steady_clock::now() - started;
  double took_s = std::chrono::duration<double>(took).count();
  std::string status_text = std::to_string(status);
  m.requests.labels({route, status_text}).inc();
  m.request_duration.labels({route}).observe(took_s);
  m.gateway_overhead.observe(std::max(0.0, took_s - std::chrono::duration<double>(backend_time).count()));
  if (!event.model.empty() && (event.prompt_tokens || event.completion_tokens)) {
    m.tokens.labels({"prompt", event.model, event.backend}).inc(static_cast<double>(event.prompt_tokens));
    m.tokens.labels({"completion", event.model, event.backend}).inc(static_cast<double>(event.completion_tokens));
  }
  if (admission && !admission->allowed) {
    // The kind of limit keeps the label bounded; which user or key is in the message.
    m.quota_rejections.labels({admission->limit}).inc();
  }
  if (!metered) return;
  if (m.per_user) {
    const auto& user = caller->key.user_name;
    m.user_requests.labels({user}).inc();
    m.user_tokens.labels({user, "prompt"}).inc(static_cast<double>(event.prompt_tokens));
    m.user_tokens.labels({user, "completion"}).inc(static_cast<double>(event.completion_tokens));
  }
  if (admission && admission->allowed) {
    gw.quotas.settle(*admission, event.prompt_tokens + event.completion_tokens, metering::now_ms());
  }
  event.status = status;
  event.latency_us = std::chrono::duration_cast<std::chrono::microseconds>(took).count();
  event.counted = admission && admission->allowed;
  if (!gw.usage->enqueue(std::move(event))) gw.metrics.metering_rows_dropped.inc();
}

}  // namespace tollgate::gateway
