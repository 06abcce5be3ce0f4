// The gateway's Prometheus metrics, declared once here.
#pragma once

#include <string>
#include <string_view>

#include "metering/metrics.hpp"

namespace tollgate::gateway {

struct GatewayMetrics {
  explicit GatewayMetrics(bool per_user);

  metering::Registry registry;
  bool per_user;

  metering::Family<metering::Counter>& requests;               // route, status
  metering::Family<metering::Histogram>& request_duration;     // route
  metering::Histogram& gateway_overhead;                       // time not spent in a backend
  metering::Family<metering::Histogram>& time_to_first_token;  // model, backend
  metering::Family<metering::Counter>& tokens;                 // direction, model, backend
  metering::Family<metering::Counter>& quota_rejections;       // limit
  metering::Family<metering::Counter>& auth_failures;          // reason
  metering::Gauge& in_flight;
  metering::Gauge& open_connections;
  metering::Counter& rejected_connections;
  metering::Gauge& metering_queue_depth;
  metering::Gauge& metering_spill_depth;
  metering::Histogram& metering_flush_duration;
  metering::Counter& metering_rows;
  metering::Counter& metering_rows_dropped;
  metering::Family<metering::Counter>& user_requests;       // user (only when per_user)
  metering::Family<metering::Counter>& user_tokens;         // user, direction (only when per_user)
  metering::Family<metering::Counter>& backend_errors;      // backend, kind
  metering::Family<metering::Histogram>& backend_duration;  // backend
  metering::Family<metering::Counter>& jobs;                // endpoint, state: jobs accepted and jobs ended
  metering::Family<metering::Gauge>& jobs_active;           // endpoint, state: IN_QUEUE and IN_PROGRESS now
  metering::Family<metering::Histogram>& job_queue_wait;    // endpoint
  metering::Family<metering::Histogram>& job_execution;     // endpoint
  metering::Family<metering::Counter>& webhooks;            // result: delivered, failed
};

}  // namespace tollgate::gateway
