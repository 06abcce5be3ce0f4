#include "metering/types.hpp"

#include <algorithm>
#include <array>

#include "metering/store.hpp"

namespace tollgate::metering {

EpochMs now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

bool ApiKey::allows_model(const std::string& model) const {
  return models.empty() || std::find(models.begin(), models.end(), model) != models.end();
}

namespace {
constexpr std::array<std::string_view, 6> kJobStateNames{"IN_QUEUE", "IN_PROGRESS", "COMPLETED",
                                                         "FAILED",   "CANCELLED",   "TIMED_OUT"};
}  // namespace

std::string_view job_state_name(JobState state) { return kJobStateNames[static_cast<std::size_t>(state)]; }

std::optional<JobState> parse_job_state(std::string_view name) {
  for (std::size_t i = 0; i < kJobStateNames.size(); ++i) {
    if (kJobStateNames[i] == name) return static_cast<JobState>(i);
  }
  return std::nullopt;
}

}  // namespace tollgate::metering
