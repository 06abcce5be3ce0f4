// Key, user, quota and usage administration: the operations the CLI and the
// /admin HTTP API share, and the HTTP API's request handling (pure apart from
// the store calls, so it runs on a blocking thread and tests without sockets).
#pragma once

#include <boost/json/object.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "metering/store.hpp"

namespace tollgate::gateway {

struct KeyRequest {
  std::string user;
  metering::Limits limits;
  std::vector<std::string> models;
  std::optional<metering::EpochMs> expires_at;
};

struct CreatedKey {
  std::string plaintext;  // shown once
  metering::ApiKey key;
};

// Validates (user name, models) and stores a new key. Throws metering::StoreError
// for invalid requests.
CreatedKey create_key(metering::Store& store, const KeyRequest& request);

// Why `model` cannot be listed on a key (empty, longer than the store keeps,
// not UTF-8, control characters), or nullopt when it can.
std::optional<std::string> model_name_problem(std::string_view model);

boost::json::object key_json(const metering::ApiKey& key);
boost::json::object user_json(const metering::User& user);
boost::json::object limits_json(const metering::Limits& limits);
boost::json::object usage_row_json(const metering::UsageRow& row);

struct AdminResponse {
  int status = 200;
  std::string body;           // JSON
  bool keys_changed = false;  // the caller refreshes its key cache
};

// Handles /admin/... for an already authenticated admin.
AdminResponse handle_admin(metering::Store& store, std::string_view method, std::string_view target,
                           std::string_view body, metering::EpochMs now);

}  // namespace tollgate::gateway
