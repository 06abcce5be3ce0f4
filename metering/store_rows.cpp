#include "metering/store_rows.hpp"

#include "metering/quota.hpp"
#include "metering/store.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::metering {

std::string join_models(const std::vector<std::string>& models) {
  std::string out;
  for (const auto& model : models) {
    if (model.empty() || model.find(',') != std::string::npos) {
      throw StoreError("invalid model name '" + model + "' (empty or containing a comma)");
    }
    if (model.size() > kMaxStoredName) throw StoreError("a model name is longer than the store keeps");
    if (!out.empty()) out += ',';
    out += model;
  }
  return out;
}

std::vector<std::string> split_models(const std::string& text) {
  std::vector<std::string> models;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    models.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return models;
}

std::map<DailyKey, DailyTotals> daily_rollup(std::span<const UsageEvent> events) {
  std::map<DailyKey, DailyTotals> daily;
  for (const UsageEvent& e : events) {
    DailyTotals& t = daily[{day_string(e.ts), e.user_id.value_or(0), e.key_id.value_or(0),
                            std::string(truncate_utf8(e.model, kMaxStoredName))}];
    const std::int64_t tokens = e.prompt_tokens + e.completion_tokens;
    t.requests += 1;
    t.counted_requests += e.counted ? 1 : 0;
    t.errors += e.status >= 400 ? 1 : 0;
    t.prompt_tokens += e.prompt_tokens;
    t.completion_tokens += e.completion_tokens;
    t.counted_tokens += e.counted ? tokens : 0;
  }
  return daily;
}

std::string budget_grant_sql(const std::string& granted, const std::string& limit, const std::string& need) {
  const std::string left = "(" + limit + " - " + granted + ")";
  const std::string beyond =
      "((" + limit + " - " + granted + " - " + need + ") / " + std::to_string(kLeaseDivisor) + ")";
  return "(CASE WHEN " + left + " < " + need + " THEN 0 WHEN " + beyond + " >= " + std::to_string(kLeaseMinimumNeeds) +
         " * " + need + " THEN " + need + " + " + beyond + " ELSE " + need + " END)";
}

}  // namespace tollgate::metering
