// What the SQLite and PostgreSQL stores share above their SQL dialects: the
// column lists they read rows back with, a key's model list as stored, and a
// usage batch summed into its daily rollup rows. Internal to metering/.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "metering/types.hpp"

namespace tollgate::metering {

inline constexpr const char* kSelectUser =
    "SELECT id, name, created_at, rpm, tpm, rpd, tpd, tokens_per_month FROM users";

inline constexpr const char* kSelectKey =
    "SELECT k.id, k.user_id, u.name, k.prefix, k.sha256, k.created_at, k.expires_at,"
    " k.revoked_at, k.models, k.rpm, k.tpm, k.rpd, k.tpd, k.tokens_per_month"
    " FROM api_keys k JOIN users u ON u.id = k.user_id";

inline constexpr const char* kSelectJob =
    "SELECT id, endpoint, user_id, key_id, state, request, webhook, output, error, created_at, started_at,"
    " finished_at, expires_at, execution_timeout_ms, ttl_ms, attempts FROM jobs";

// A key's models as one column: comma-separated. StoreError for an empty name,
// one with a comma, or one longer than the store keeps.
std::string join_models(const std::vector<std::string>& models);
std::vector<std::string> split_models(const std::string& text);

// One usage_daily row's key (user 0 / key 0: none) and the counts a batch adds to it.
struct DailyKey {
  std::string day;
  std::int64_t user_id = 0, key_id = 0;
  std::string model;
  auto operator<=>(const DailyKey&) const = default;
};
struct DailyTotals {
  std::int64_t requests = 0, counted_requests = 0, errors = 0, prompt_tokens = 0, completion_tokens = 0,
               counted_tokens = 0;
};

// The batch summed per (day, user, key, model): one upsert per row instead of
// one per event keeps the writer well ahead of the load.
std::map<DailyKey, DailyTotals> daily_rollup(std::span<const UsageEvent> events);

// Shared quota budgets, the same table in both stores.
inline constexpr const char* kBudgetColumns = "subject, limit_name, window_id, window_end, granted, last_grant";

// SQL for what a claim is granted (store.hpp's kLeaseDivisor rule), given the
// SQL of what is granted already, of the limit and of the need.
std::string budget_grant_sql(const std::string& granted, const std::string& limit, const std::string& need);

// The order in which a transaction touches budgets: the same in every replica,
// so two transactions never wait on each other's rows in a cycle.
template <class Row>
std::vector<std::size_t> budget_order(std::span<const Row> rows) {
  std::vector<std::size_t> order(rows.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return std::tie(rows[a].subject, rows[a].limit_name, rows[a].window) <
           std::tie(rows[b].subject, rows[b].limit_name, rows[b].window);
  });
  return order;
}

}  // namespace tollgate::metering
