#include "gateway/admin.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/url_view.hpp>

#include "gateway/http_error.hpp"
#include "metering/api_key.hpp"
#include "metering/quota.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace json = boost::json;
namespace {

using metering::Limits;

struct LimitField {
  const char* name;
  std::optional<std::int64_t> Limits::*member;
};
constexpr LimitField kLimitFields[] = {
    {"requests_per_minute", &Limits::requests_per_minute}, {"tokens_per_minute", &Limits::tokens_per_minute},
    {"requests_per_day", &Limits::requests_per_day},       {"tokens_per_day", &Limits::tokens_per_day},
    {"tokens_per_month", &Limits::tokens_per_month},
};

json::value optional_json(const std::optional<std::int64_t>& v) { return v ? json::value(*v) : json::value(nullptr); }

json::value time_json(const std::optional<metering::EpochMs>& t) {
  return t ? json::value(*t / 1000) : json::value(nullptr);
}

AdminResponse error(const ApiError& e) { return {e.status, e.body(), false}; }
AdminResponse ok(json::value v, int status = 200, bool keys_changed = false) {
  return {status, json::serialize(v), keys_changed};
}

// Reads limit fields present in `o` over `limits`; null clears one.
std::optional<ApiError> read_limits(const json::object& o, Limits& limits) {
  for (const auto& f : kLimitFields) {
    const json::value* v = o.if_contains(f.name);
    if (!v) continue;
    if (v->is_null()) {
      limits.*f.member = std::nullopt;
    } else if (v->is_int64() && v->get_int64() >= 0) {
      limits.*f.member = v->get_int64();
    } else {
      return bad_request(std::string("'") + f.name + "' must be a non-negative integer or null", f.name,
                         "invalid_type");
    }
  }
  return std::nullopt;
}

std::optional<ApiError> parse_object(std::string_view body, json::object& out) {
  json::error_code ec;
  auto v = json::parse(body.empty() ? std::string_view("{}") : body, ec);
  if (ec || !v.is_object()) return bad_request("the request body must be a JSON object", std::nullopt, "invalid_json");
  out = std::move(v.get_object());
  return std::nullopt;
}

std::vector<std::string> split_path(std::string_view path) {
  std::vector<std::string> parts;
  std::size_t i = 0;
  while (i < path.size()) {
    auto next = path.find('/', i);
    if (next == std::string_view::npos) next = path.size();
    if (next > i) parts.emplace_back(path.substr(i, next - i));
    i = next + 1;
  }
  return parts;
}

// A key prefix as a path names it: generated prefixes are short ASCII.
constexpr std::size_t kMaxKeyPrefix = 64;
// A key restricted to more models than this is better left unrestricted.
constexpr std::size_t kMaxKeyModels = 256;

std::optional<ApiError> key_prefix_problem(std::string_view prefix) {
  if (prefix.size() > kMaxKeyPrefix) {
    return bad_request("a key prefix has at most " + std::to_string(kMaxKeyPrefix) + " bytes", std::nullopt,
                       "invalid_key_prefix");
  }
  return std::nullopt;
}

AdminResponse create_key_from_json(metering::Store& store, const json::object& o) {
  KeyRequest request;
  const json::value* user = o.if_contains("user");
  if (!user || !user->is_string())
    return error(bad_request("'user' is required", "user", "missing_required_parameter"));
  request.user = user->get_string();
  if (auto problem = metering::user_name_problem(request.user)) {
    return error(bad_request(*problem, "user", "invalid_user_name"));
  }
  if (auto e = read_limits(o, request.limits)) return error(*e);
  if (const json::value* models = o.if_contains("models"); models && !models->is_null()) {
    if (!models->is_array())
      return error(bad_request("'models' must be an array of strings", "models", "invalid_type"));
    for (const auto& m : models->get_array()) {
      if (!m.is_string()) return error(bad_request("'models' must be an array of strings", "models", "invalid_type"));
      request.models.emplace_back(m.get_string());
    }
  }
  if (const json::value* expires = o.if_contains("expires_at"); expires && !expires->is_null()) {
    std::optional<metering::EpochMs> t;
    if (expires->is_string())
      t = metering::parse_utc_time(expires->get_string());
    else if (expires->is_int64())
      t = expires->get_int64() * 1000;
    if (!t) {
      return error(bad_request("'expires_at' must be a date (YYYY-MM-DD[THH:MM[:SS]]Z) or Unix seconds", "expires_at"));
    }
    request.expires_at = t;
  }
  auto created = create_key(store, request);
  auto body = key_json(created.key);
  body["key"] = created.plaintext;
  return ok(body, 201, true);
}

AdminResponse usage_report(metering::Store& store, const boost::urls::url_view& url) {
  metering::UsageQuery query;
  for (const auto& param : url.params()) {
    if (param.key == "user") {
      query.user = std::string(param.value);
    } else if (param.key == "since") {
      auto t = metering::parse_utc_time(param.value);
      if (!t) return error(bad_request("'since' must be a date (YYYY-MM-DD)", "since"));
      query.since = t;
    } else if (param.key == "group_by") {
      std::string v(param.value);
      query.by_day = v.find("day") != std::string::npos;
      query.by_model = v.find("model") != std::string::npos;
    } else {
      auto name = metering::excerpt(param.key);
      return error(bad_request("unknown query parameter '" + name + "'", name));
    }
  }
  json::array rows;
  for (const auto& row : store.usage(query)) rows.push_back(usage_row_json(row));
  return ok(json::object{{"object", "list"}, {"data", std::move(rows)}});
}

}  // namespace

std::optional<std::string> model_name_problem(std::string_view model) {
  if (model.empty()) return "model names must not be empty";
  if (model.size() > metering::kMaxStoredName) {
    return "a model name has at most " + std::to_string(metering::kMaxStoredName) + " bytes";
  }
  if (!metering::valid_utf8(model)) return "a model name must be valid UTF-8";
  for (unsigned char c : model) {
    if (c < 0x20 || c == 0x7F) return "a model name must not contain control characters";
  }
  return std::nullopt;
}

CreatedKey create_key(metering::Store& store, const KeyRequest& request) {
  if (auto problem = metering::user_name_problem(request.user)) throw metering::StoreError(*problem);
  if (request.models.size() > kMaxKeyModels) {
    throw metering::StoreError("a key may list at most " + std::to_string(kMaxKeyModels) + " models");
  }
  for (const auto& model : request.models) {
    if (auto problem = model_name_problem(model)) throw metering::StoreError(*problem);
  }
  auto generated = metering::generate_api_key();
  metering::NewKey key{request.user,       generated.prefix, generated.sha256_hex,
                       request.expires_at, request.models,   request.limits};
  return {generated.plaintext, store.insert_key(key)};
}

json::object limits_json(const Limits& limits) {
  json::object o;
  for (const auto& f : kLimitFields) o[f.name] = optional_json(limits.*f.member);
  return o;
}

json::object key_json(const metering::ApiKey& key) {
  json::array models;
  for (const auto& m : key.models) models.emplace_back(m);
  return {{"id", key.id},
          {"prefix", key.prefix},
          {"user", key.user_name},
          {"created_at", key.created_at / 1000},
          {"expires_at", time_json(key.expires_at)},
          {"revoked_at", time_json(key.revoked_at)},
          {"models", std::move(models)},
          {"limits", limits_json(key.limits)}};
}

json::object user_json(const metering::User& user) {
  return {{"id", user.id},
          {"name", user.name},
          {"created_at", user.created_at / 1000},
          {"limits", limits_json(user.limits)}};
}

json::object usage_row_json(const metering::UsageRow& row) {
  json::object o{{"user", row.user},
                 {"requests", row.requests},
                 {"errors", row.errors},
                 {"prompt_tokens", row.prompt_tokens},
                 {"completion_tokens", row.completion_tokens},
                 {"total_tokens", row.prompt_tokens + row.completion_tokens}};
  if (!row.day.empty()) o["day"] = row.day;
  if (!row.model.empty()) o["model"] = row.model;
  return o;
}

AdminResponse handle_admin(metering::Store& store, std::string_view method, std::string_view target,
                           std::string_view body, metering::EpochMs now) {
  auto parsed = boost::urls::parse_origin_form(target);
  if (!parsed) return error(bad_request("malformed request target"));
  const auto& url = *parsed;
  auto parts = split_path(url.path());  // "admin", resource, ...
  try {
    if (parts.size() < 2 || parts[0] != "admin") return error(not_found("unknown admin route"));
    const std::string& resource = parts[1];

    if (resource == "users") {
      if (parts.size() == 2 && method == "GET") {
        json::array users;
        for (const auto& u : store.list_users()) users.push_back(user_json(u));
        return ok(json::object{{"object", "list"}, {"data", std::move(users)}});
      }
      if (parts.size() == 2 && method == "POST") {
        json::object o;
        if (auto e = parse_object(body, o)) return error(*e);
        const json::value* name = o.if_contains("name");
        if (!name || !name->is_string()) {
          return error(bad_request("'name' is required", "name", "missing_required_parameter"));
        }
        if (auto problem = metering::user_name_problem(name->get_string())) {
          return error(bad_request(*problem, "name", "invalid_user_name"));
        }
        auto user = store.ensure_user(name->get_string());
        Limits limits = user.limits;
        if (auto e = read_limits(o, limits)) return error(*e);
        if (limits != user.limits) store.set_user_limits(user.name, limits);
        return ok(user_json(*store.find_user(user.name)), 201, true);
      }
      if (parts.size() >= 3) {
        if (auto problem = metering::user_name_problem(parts[2])) {
          return error(bad_request(*problem, std::nullopt, "invalid_user_name"));
        }
        auto user = store.find_user(parts[2]);
        if (!user) return error(not_found("no user named '" + parts[2] + "'", "user_not_found"));
        if (parts.size() == 3 && method == "GET") return ok(user_json(*user));
        if (parts.size() == 4 && parts[3] == "quota" && (method == "PUT" || method == "PATCH")) {
          json::object o;
          if (auto e = parse_object(body, o)) return error(*e);
          Limits limits = method == "PATCH" ? user->limits : Limits{};
          if (auto e = read_limits(o, limits)) return error(*e);
          store.set_user_limits(user->name, limits);
          return ok(user_json(*store.find_user(user->name)), 200, true);
        }
      }
    } else if (resource == "keys") {
      if (parts.size() == 2 && method == "GET") {
        std::optional<std::string> user;
        for (const auto& p : url.params()) {
          if (p.key == "user") user = std::string(p.value);
        }
        json::array keys;
        for (const auto& k : store.list_keys(user)) keys.push_back(key_json(k));
        return ok(json::object{{"object", "list"}, {"data", std::move(keys)}});
      }
      if (parts.size() == 2 && method == "POST") {
        json::object o;
        if (auto e = parse_object(body, o)) return error(*e);
        return create_key_from_json(store, o);
      }
      if (parts.size() >= 3) {
        if (auto e = key_prefix_problem(parts[2])) return error(*e);
      }
      const bool revoke =
          (parts.size() == 3 && method == "DELETE") || (parts.size() == 4 && parts[3] == "revoke" && method == "POST");
      if (revoke) {
        const auto keys = store.list_keys();
        // A prefix of a prefix, as the store resolves it (it refuses an ambiguous one: 400).
        const bool known =
            std::any_of(keys.begin(), keys.end(), [&](const auto& k) { return k.prefix.starts_with(parts[2]); });
        if (!known)
          return error(not_found("no key with prefix '" + metering::excerpt(parts[2]) + "'", "key_not_found"));
        return ok(key_json(store.revoke_key(parts[2], now)), 200, true);
      }
      if (parts.size() == 4 && parts[3] == "quota" && (method == "PUT" || method == "PATCH")) {
        json::object o;
        if (auto e = parse_object(body, o)) return error(*e);
        std::optional<metering::ApiKey> key;
        for (auto& k : store.list_keys()) {
          if (k.prefix.starts_with(parts[2])) key = k;
        }
        if (!key) return error(not_found("no key with prefix '" + parts[2] + "'", "key_not_found"));
        Limits limits = method == "PATCH" ? key->limits : Limits{};
        if (auto e = read_limits(o, limits)) return error(*e);
        store.set_key_limits(parts[2], limits);
        key->limits = limits;
        return ok(key_json(*key), 200, true);
      }
    } else if (resource == "usage" && parts.size() == 2 && method == "GET") {
      return usage_report(store, url);
    }
    return error(not_found("unknown admin route: " + metering::excerpt(method) + " " + metering::excerpt(url.path())));
  } catch (const metering::StoreError& e) {
    return error(bad_request(e.what()));
  }
}

}  // namespace tollgate::gateway
