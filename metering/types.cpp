#include "metering/types.hpp"

#include <algorithm>

namespace tollgate::metering {

EpochMs now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

bool ApiKey::allows_model(const std::string& model) const {
  return models.empty() || std::find(models.begin(), models.end(), model) != models.end();
}

}  // namespace tollgate::metering
