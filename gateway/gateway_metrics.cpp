#include "gateway/gateway_metrics.hpp"

namespace tollgate::gateway {

GatewayMetrics::GatewayMetrics(bool per_user_series)
    : per_user(per_user_series),
      requests(registry.counter("tollgate_http_requests_total", "HTTP requests answered, by route and status.",
                                {"route", "status"})),
      request_duration(registry.histogram("tollgate_http_request_duration_seconds",
                                          "Time from request headers to the last byte of the response.", {"route"},
                                          metering::latency_buckets())),
      gateway_overhead(registry
                           .histogram("tollgate_gateway_overhead_seconds",
                                      "Time a request spent in the gateway itself, outside any backend.", {},
                                      metering::latency_buckets())
                           .labels({})),
      time_to_first_token(registry.histogram("tollgate_time_to_first_token_seconds",
                                             "Time from request to the first streamed token.", {"model", "backend"},
                                             metering::latency_buckets())),
      tokens(registry.counter("tollgate_tokens_total", "Tokens processed, by direction (prompt or completion).",
                              {"direction", "model", "backend"})),
      quota_rejections(registry.counter("tollgate_quota_rejections_total",
                                        "Requests refused with 429 by a quota or rate limit.", {"limit"})),
      auth_failures(registry.counter("tollgate_auth_failures_total", "Requests refused with 401 or 403.", {"reason"})),
      in_flight(registry.gauge("tollgate_http_requests_in_flight", "Requests being handled now.").labels({})),
      open_connections(registry.gauge("tollgate_http_connections_open", "Client connections open now.").labels({})),
      rejected_connections(registry
                               .counter("tollgate_http_connections_rejected_total",
                                        "Connections closed at accept because max_connections was reached.")
                               .labels({})),
      metering_queue_depth(
          registry.gauge("tollgate_metering_queue_depth", "Usage events waiting for the writer thread.").labels({})),
      metering_spill_depth(registry
                               .gauge("tollgate_metering_spill_rows",
                                      "Usage events in the spill file, waiting for the database to take them.")
                               .labels({})),
      metering_flush_duration(registry
                                  .histogram("tollgate_metering_flush_duration_seconds",
                                             "Time to commit one batch of usage events to SQLite.", {},
                                             metering::latency_buckets())
                                  .labels({})),
      metering_rows(
          registry.counter("tollgate_metering_rows_written_total", "Usage events committed to SQLite.").labels({})),
      metering_rows_dropped(registry
                                .counter("tollgate_metering_rows_dropped_total",
                                         "Usage events dropped because the writer's queue was full (the store kept "
                                         "failing).")
                                .labels({})),
      user_requests(registry.counter("tollgate_user_requests_total",
                                     "Requests per user (only when metering.per_user_metrics is on).", {"user"})),
      user_tokens(registry.counter("tollgate_user_tokens_total",
                                   "Tokens per user (only when metering.per_user_metrics is on).",
                                   {"user", "direction"})),
      backend_errors(registry.counter("tollgate_backend_errors_total",
                                      "Completions a backend failed (upstream refused, timed out, 429, 5xx, "
                                      "died mid-stream), by backend and error kind.",
                                      {"backend", "kind"})),
      backend_duration(registry.histogram("tollgate_backend_request_duration_seconds",
                                          "Time from starting a backend call to its final event.", {"backend"},
                                          metering::latency_buckets())),
      jobs(registry.counter("tollgate_jobs_total",
                            "Jobs of the /v2 job API by endpoint and state: IN_QUEUE counts jobs accepted, the "
                            "final states count jobs ended.",
                            {"endpoint", "state"})),
      jobs_active(registry.gauge("tollgate_jobs", "Jobs waiting (IN_QUEUE) and running (IN_PROGRESS) now.",
                                 {"endpoint", "state"})),
      job_queue_wait(registry.histogram("tollgate_job_queue_wait_seconds", "Time a job waited before it started.",
                                        {"endpoint"}, metering::latency_buckets())),
      job_execution(registry.histogram("tollgate_job_execution_seconds", "Time a job ran.", {"endpoint"},
                                       metering::latency_buckets())),
      webhooks(registry.counter("tollgate_job_webhooks_total",
                                "Job webhooks by result: delivered, or failed after every attempt.", {"result"})) {
  metering::add_process_collector(registry);
}

}  // namespace tollgate::gateway
