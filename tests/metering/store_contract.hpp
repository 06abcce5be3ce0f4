// The store contract: what every metering::Store implementation must do,
// tested once (store_contract_test.cpp) and run against each store: SQLite in
// the unit tests (store_contract_sqlite.cpp), PostgreSQL in
// tollgate_postgres_tests (store_contract_postgres.cpp). Each binary defines
// ContractDatabase for its store.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "metering/store.hpp"

namespace tollgate::metering::test {

// One new, empty database, gone when the object goes.
class ContractDatabase {
 public:
  ContractDatabase();
  ~ContractDatabase();
  ContractDatabase(const ContractDatabase&) = delete;
  ContractDatabase& operator=(const ContractDatabase&) = delete;

  // A new connection to it (the store migrates it at the first open).
  std::unique_ptr<Store> open() const { return open_store(location_); }
  // What open_store takes: a file path or a postgresql:// URL.
  const std::string& location() const { return location_; }

 private:
  std::string location_;
};

inline UsageQuery usage_query(std::optional<std::string> user, std::optional<EpochMs> since, bool by_day,
                              bool by_model) {
  UsageQuery query;
  query.user = std::move(user);
  query.since = since;
  query.by_day = by_day;
  query.by_model = by_model;
  return query;
}

inline NewKey new_key(std::string user, std::string prefix, std::string hash) {
  NewKey key;
  key.user_name = std::move(user);
  key.prefix = std::move(prefix);
  key.sha256_hex = std::move(hash);
  return key;
}

inline UsageEvent event(EpochMs ts, std::optional<std::int64_t> user, std::optional<std::int64_t> key,
                        std::string model, int status, std::int64_t prompt, std::int64_t completion,
                        bool counted = true) {
  UsageEvent e;
  e.ts = ts;
  e.user_id = user;
  e.key_id = key;
  e.route = "/v1/chat/completions";
  e.model = std::move(model);
  e.backend = "echo";
  e.status = status;
  e.prompt_tokens = prompt;
  e.completion_tokens = completion;
  e.latency_us = 1234;
  e.counted = counted;
  return e;
}

// Timestamps (UTC), checked against Python's datetime.
constexpr EpochMs k2024_03_15_102030 = 1710498030000;
constexpr EpochMs k2024_03_15_102000 = 1710498000000;
constexpr EpochMs k2024_03_14_230000 = 1710457200000;
constexpr EpochMs k2024_03_01_000000 = 1709251200000;
constexpr EpochMs k2024_02_29_235959_999 = 1709251199999;
constexpr EpochMs k2024_03_16_000000 = 1710547200000;
constexpr EpochMs k2024_12_31_235959 = 1735689599000;
constexpr EpochMs k2024_12_01_000000 = 1733011200000;
constexpr EpochMs k2024_11_30_120000 = 1732968000000;


}  // namespace tollgate::metering::test
