// One request's bookkeeping: metrics and the usage row, recorded once at the end.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string_view>

#include "gateway/auth.hpp"
#include "metering/quota.hpp"
#include "metering/types.hpp"

namespace tollgate::gateway {

struct Gateway;

struct Exchange {
  Gateway& gw;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  metering::UsageEvent event;
  std::string_view route;  // the metrics label
  bool metered = false;    // a usage row is written (the caller presented a known key)
  std::shared_ptr<const KeyEntry> caller;
  std::optional<metering::Admission> admission;
  std::chrono::microseconds backend_time{0};
  bool finished = false;

  // `label`: the route's metrics label, also the usage row's route until set otherwise.
  Exchange(Gateway& g, std::string_view label);
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  // A request that ends by an exception is still counted and metered.
  ~Exchange();

  void identify(std::shared_ptr<const KeyEntry> entry);
  metering::QuotaSubject subject() const;
  // Counts the request with its final status, settles its quota and queues its usage row.
  void finish(int status);
};

}  // namespace tollgate::gateway
