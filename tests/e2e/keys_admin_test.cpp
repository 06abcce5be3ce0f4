// API keys, users, the /admin API and the key/user/usage CLI, through the real binary.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sqlite3.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <regex>
#include <sstream>
#include <thread>

#include "harness.hpp"
#include "metering/api_key.hpp"
#include "metering/quota.hpp"
#include "metering/types.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

// Two models on one echo backend, and a short flush so usage shows up quickly.
const std::string kTwoModels = R"(
metering: {flush_interval: 100ms}
backends:
  - {name: echo, type: echo}
models:
  - {name: echo, deployments: [{backend: echo}]}
  - {name: other, deployments: [{backend: echo}]}
)";

using Row = std::vector<std::optional<std::string>>;

// Every row of `sql`, each column as text (nullopt for NULL).
std::vector<Row> query_rows(const std::string& db, const std::string& sql) {
  sqlite3* handle = nullptr;
  if (sqlite3_open_v2(db.c_str(), &handle, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(handle);
    throw std::runtime_error("cannot open " + db);
  }
  sqlite3_busy_timeout(handle, 5000);
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(handle, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
    std::string message = sqlite3_errmsg(handle);
    sqlite3_close(handle);
    throw std::runtime_error("cannot prepare " + sql + ": " + message);
  }
  std::vector<Row> rows;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    Row row;
    for (int i = 0; i < sqlite3_column_count(stmt); ++i) {
      const auto* text = sqlite3_column_text(stmt, i);
      if (text) row.emplace_back(reinterpret_cast<const char*>(text));
      else row.emplace_back(std::nullopt);
    }
    rows.push_back(std::move(row));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(handle);
  return rows;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The display prefix the CLI and admin API use: "tg-" and eight characters.
std::string prefix_of(const std::string& key) { return key.substr(0, 11); }

std::int64_t key_id(const std::string& db, const std::string& key) {
  auto rows = query_rows(db, "SELECT id FROM api_keys WHERE sha256 = '" + tollgate::metering::sha256_hex(key) + "'");
  REQUIRE(rows.size() == 1);
  return std::stoll(*rows[0][0]);
}

void check_openai_error(const HttpResponse& r, const std::string& type) {
  INFO(r.body);
  CHECK(r.header("content-type") == "application/json");
  auto body = r.json();
  REQUIRE(body.is_object());
  REQUIRE(body.as_object().size() == 1);
  const auto& error = body.at("error").as_object();
  CHECK(error.size() == 4);
  CHECK(error.at("message").is_string());
  CHECK(!error.at("message").as_string().empty());
  CHECK(error.at("type") == json::value(type));
  CHECK(error.contains("param"));
  CHECK(error.contains("code"));
}

std::string error_code(const HttpResponse& r) {
  auto body = r.json();
  const auto& code = body.at("error").at("code");
  return code.is_string() ? std::string(code.as_string()) : std::string();
}

std::vector<std::string> model_ids(const HttpResponse& r) {
  std::vector<std::string> ids;
  auto body = r.json();
  for (const auto& m : body.at("data").as_array()) ids.emplace_back(m.at("id").as_string());
  std::sort(ids.begin(), ids.end());
  return ids;
}

// Polls `ok` up to `bound`, returning whether it became true.
template <class F>
bool eventually(F ok, std::chrono::milliseconds bound = 10s) {
  auto deadline = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ok()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return ok();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<std::string> fields_of(const std::string& line) {
  std::vector<std::string> fields;
  std::istringstream in(line);
  for (std::string f; in >> f;) fields.push_back(f);
  return fields;
}

// The `keys list` line of the key with `prefix`, or empty.
std::string key_line(const std::string& listing, const std::string& prefix) {
  for (const auto& line : lines_of(listing)) {
    if (line.rfind(prefix, 0) == 0) return line;
  }
  return {};
}

}  // namespace

TEST_CASE("a key is tg- plus base62, and the database keeps only its SHA-256", "[e2e][keys]") {
  TempDir dir;
  auto db = dir.file("keys.db");
  auto key = create_key(db, "alice");
  auto other = create_key(db, "alice");
  CHECK(std::regex_match(key, std::regex("tg-[A-Za-z0-9]{22,}")));
  CHECK(std::regex_match(other, std::regex("tg-[A-Za-z0-9]{22,}")));
  CHECK(key != other);

  auto rows = query_rows(db, "SELECT * FROM api_keys WHERE sha256 = '" + tollgate::metering::sha256_hex(key) + "'");
  REQUIRE(rows.size() == 1);
  auto all = query_rows(db, "SELECT * FROM api_keys");
  REQUIRE(all.size() == 2);
  // The part past the display prefix is the secret: it must appear in no column.
  std::string secret = key.substr(11);
  std::string other_secret = other.substr(11);
  for (const auto& row : all) {
    for (const auto& column : row) {
      if (!column) continue;
      CHECK(column->find(secret) == std::string::npos);
      CHECK(column->find(other_secret) == std::string::npos);
    }
  }
  auto columns = query_rows(db, "SELECT sha256, prefix FROM api_keys WHERE sha256 = '" +
                                    tollgate::metering::sha256_hex(key) + "'");
  REQUIRE(columns.size() == 1);
  CHECK(*columns[0][0] == tollgate::metering::sha256_hex(key));
  CHECK(columns[0][0]->size() == 64);
  CHECK(key.rfind(*columns[0][1], 0) == 0);  // the stored prefix is a prefix of the key

  // Not anywhere else in the files either (settings, WAL, freed pages).
  for (const auto& file : {db, db + "-wal"}) {
    auto bytes = read_bytes(file);
    CHECK(bytes.find(secret) == std::string::npos);
  }
}

TEST_CASE("Bearer and x-api-key both authenticate, a wrong or missing key is an OpenAI-style 401",
          "[e2e][keys][auth]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());

  auto bearer = client.post("/v1/chat/completions", key, chat_body("echo", "hi there"));
  CHECK(bearer.status == 200);
  auto x_api_key = client.request("POST", "/v1/chat/completions", chat_body("echo", "hi there"), {{"x-api-key", key}});
  CHECK(x_api_key.status == 200);
  CHECK(x_api_key.json().at("choices").at(0).at("message").at("content") == "hi there");
  auto lower = client.request("GET", "/v1/models", "", {{"authorization", "bearer " + key}});
  CHECK(lower.status == 200);

  auto wrong = client.post("/v1/chat/completions", key + "x", chat_body("echo", "hi"));
  CHECK(wrong.status == 401);
  check_openai_error(wrong, "authentication_error");
  auto wrong_header = client.request("POST", "/v1/chat/completions", chat_body("echo", "hi"),
                                     {{"x-api-key", "tg-notarealkeyatallnotarealkey"}});
  CHECK(wrong_header.status == 401);
  check_openai_error(wrong_header, "authentication_error");

  auto missing = client.request("POST", "/v1/chat/completions", chat_body("echo", "hi"));
  CHECK(missing.status == 401);
  check_openai_error(missing, "authentication_error");
  CHECK(error_code(missing) == "missing_api_key");
  auto missing_models = client.get("/v1/models");
  CHECK(missing_models.status == 401);
  check_openai_error(missing_models, "authentication_error");
  auto empty_bearer = client.request("GET", "/v1/models", "", {{"Authorization", "Bearer "}});
  CHECK(empty_bearer.status == 401);

  // The keep-alive connection survived every refusal.
  CHECK(client.post("/v1/chat/completions", key, chat_body("echo", "still here")).status == 200);
}

TEST_CASE("a revoked key is refused by the running gateway, and the refusals are metered", "[e2e][keys]") {
  TempDir dir;
  GatewayProcess gw(dir);
  auto key = create_key(gw.db(), "alice");
  auto unrelated = create_key(gw.db(), "bob");
  wait_for_key(gw.port(), key);
  wait_for_key(gw.port(), unrelated);
  {
    HttpClient client(gw.port());
    REQUIRE(client.post("/v1/chat/completions", key, chat_body("echo", "before")).status == 200);
  }

  auto revoked = run_tollgate({"keys", "revoke", prefix_of(key), "--db", gw.db()});
  REQUIRE(revoked.exit_code == 0);
  CHECK(revoked.out.find(prefix_of(key)) != std::string::npos);

  // The gateway re-reads keys every second; give it a generous bound.
  int refusals = 0;
  bool refused = eventually([&] {
    HttpClient client(gw.port());
    auto r = client.post("/v1/chat/completions", key, chat_body("echo", "after"));
    if (r.status == 401) {
      ++refusals;
      check_openai_error(r, "authentication_error");
      CHECK(error_code(r) == "revoked_api_key");
    }
    return r.status == 401;
  });
  REQUIRE(refused);
  {
    HttpClient client(gw.port());
    auto again = client.post("/v1/chat/completions", key, chat_body("echo", "again"));
    CHECK(again.status == 401);
    if (again.status == 401) ++refusals;
    // Another key of the same database is untouched.
    CHECK(client.post("/v1/chat/completions", unrelated, chat_body("echo", "fine")).status == 200);
  }

  REQUIRE(gw.stop(SIGTERM) == 0);
  auto id = key_id(gw.db(), key);
  CHECK(count_usage_rows(gw.db(), "status = 401 AND key_id = " + std::to_string(id)) == refusals);
  CHECK(count_usage_rows(gw.db(), "status = 401 AND route LIKE '%chat%' AND key_id = " + std::to_string(id)) ==
        refusals);
}

TEST_CASE("an expired key is refused", "[e2e][keys]") {
  TempDir dir;
  auto db = dir.file("expired.db");
  // Created before the gateway starts, so its first snapshot already holds them.
  auto expired = create_key(db, "alice", {"--expires", "2020-01-01"});
  auto future = create_key(db, "alice", {"--expires", "2999-01-01"});
  GatewayProcess gw(dir, {.config_yaml = "", .db = db, .env = {}});
  HttpClient client(gw.port());
  auto r = client.post("/v1/chat/completions", expired, chat_body("echo", "hi"));
  CHECK(r.status == 401);
  check_openai_error(r, "authentication_error");
  CHECK(error_code(r) == "expired_api_key");
  CHECK(client.get("/v1/models", expired).status == 401);
  CHECK(client.post("/v1/chat/completions", future, chat_body("echo", "hi")).status == 200);
}

TEST_CASE("a key restricted to some models: 404 for unknown models, 403 for others, /v1/models filtered",
          "[e2e][keys]") {
  TempDir dir;
  auto db = dir.file("models.db");
  auto restricted = create_key(db, "alice", {"--models", "echo"});
  auto open = create_key(db, "bob");
  GatewayProcess gw(dir, {.config_yaml = kTwoModels, .db = db, .env = {}});
  HttpClient client(gw.port());

  CHECK(client.post("/v1/chat/completions", restricted, chat_body("echo", "hi")).status == 200);
  auto unknown = client.post("/v1/chat/completions", restricted, chat_body("no-such-model", "hi"));
  CHECK(unknown.status == 404);
  check_openai_error(unknown, "not_found_error");
  CHECK(error_code(unknown) == "model_not_found");
  auto forbidden = client.post("/v1/chat/completions", restricted, chat_body("other", "hi"));
  CHECK(forbidden.status == 403);
  check_openai_error(forbidden, "permission_error");
  CHECK(forbidden.json().at("error").at("message").as_string().find("other") != json::string::npos);
  auto forbidden_completion =
      client.post("/v1/completions", restricted, R"({"model":"other","prompt":"hi"})");
  CHECK(forbidden_completion.status == 403);

  CHECK(client.post("/v1/chat/completions", open, chat_body("other", "hi")).status == 200);

  auto restricted_models = client.get("/v1/models", restricted);
  REQUIRE(restricted_models.status == 200);
  CHECK(model_ids(restricted_models) == std::vector<std::string>{"echo"});
  auto open_models = client.get("/v1/models", open);
  REQUIRE(open_models.status == 200);
  CHECK(model_ids(open_models) == std::vector<std::string>{"echo", "other"});
  CHECK(open_models.json().at("data").at(0).at("created").as_int64() > 1'700'000'000);

  // One model (the SDKs' models.retrieve): the same object; a model the key
  // may not use is as absent as one that does not exist.
  auto one = client.get("/v1/models/echo", restricted);
  REQUIRE(one.status == 200);
  CHECK(one.json().at("id") == "echo");
  CHECK(one.json().at("object") == "model");
  CHECK(one.json().at("created") == open_models.json().at("data").at(0).at("created"));
  CHECK(client.get("/v1/models/ec%68o", restricted).json().at("id") == "echo");  // percent-decoded
  auto hidden = client.get("/v1/models/other", restricted);
  CHECK(hidden.status == 404);
  CHECK(error_code(hidden) == "model_not_found");
  CHECK(client.get("/v1/models/other", open).status == 200);
  CHECK(error_code(client.get("/v1/models/no-such-model", open)) == "model_not_found");
  CHECK(client.get("/v1/models/", open).status == 404);
  CHECK(client.get("/v1/models/echo").status == 401);
}

TEST_CASE("the admin key printed at first start opens /admin, user keys and no key do not", "[e2e][admin]") {
  TempDir dir;
  GatewayProcess gw(dir);
  REQUIRE(std::regex_match(gw.admin_key(), std::regex("tg-admin-[A-Za-z0-9]{22,}")));
  auto user_key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), user_key);
  HttpClient client(gw.port());

  auto users = client.get("/admin/users", gw.admin_key());
  REQUIRE(users.status == 200);
  bool found = false;
  auto users_body = users.json();
  for (const auto& u : users_body.at("data").as_array()) found = found || u.at("name") == "alice";
  CHECK(found);
  CHECK(client.request("GET", "/admin/keys", "", {{"x-api-key", gw.admin_key()}}).status == 200);

  auto as_user = client.get("/admin/users", user_key);
  CHECK(as_user.status == 403);
  check_openai_error(as_user, "permission_error");
  auto no_key = client.get("/admin/users");
  CHECK(no_key.status == 401);
  check_openai_error(no_key, "authentication_error");
  auto wrong = client.get("/admin/users", gw.admin_key() + "x");
  CHECK(wrong.status == 401);
  auto create_as_user = client.post("/admin/keys", user_key, R"({"user":"mallory"})");
  CHECK(create_as_user.status == 403);
  // The admin key is no API key for completions. (The refusal above left the
  // body unread, so that connection closed.)
  HttpClient fresh(gw.port());
  CHECK(fresh.post("/v1/chat/completions", gw.admin_key(), chat_body("echo", "hi")).status == 401);

  // It stays the admin key across restarts, and is not printed again.
  REQUIRE(gw.stop(SIGTERM) == 0);
  GatewayProcess again(dir, {.config_yaml = "", .db = gw.db(), .env = {}});
  CHECK(again.admin_key().empty());
  HttpClient client2(again.port());
  CHECK(client2.get("/admin/users", gw.admin_key()).status == 200);
}

TEST_CASE("TOLLGATE_ADMIN_KEY sets the admin key and nothing is printed", "[e2e][admin]") {
  TempDir dir;
  const std::string admin = "tg-admin-from-the-environment-0123456789";
  GatewayProcess gw(dir, {.config_yaml = "", .db = "", .env = {{"TOLLGATE_ADMIN_KEY", admin}}});
  CHECK(gw.admin_key().empty());
  CHECK(gw.log().find("admin key") == std::string::npos);
  HttpClient client(gw.port());
  CHECK(client.get("/admin/keys", admin).status == 200);
  CHECK(client.get("/admin/keys", admin + "0").status == 401);
  CHECK(client.get("/admin/keys").status == 401);
}

TEST_CASE("the admin API creates, lists, limits and revokes keys and reports usage", "[e2e][admin]") {
  TempDir dir;
  GatewayProcess gw(dir, {.config_yaml = kTwoModels, .db = "", .env = {}});
  const auto& admin = gw.admin_key();
  REQUIRE(!admin.empty());
  HttpClient client(gw.port());

  auto created = client.post("/admin/keys", admin, R"({"user":"u","models":["echo"],"requests_per_minute":5})");
  REQUIRE(created.status == 201);
  auto created_body = created.json();
  std::string key(created_body.at("key").as_string());
  CHECK(std::regex_match(key, std::regex("tg-[A-Za-z0-9]{22,}")));
  CHECK(created_body.at("user") == "u");
  CHECK(created_body.at("prefix") == json::value(prefix_of(key)));
  CHECK(created_body.at("limits").at("requests_per_minute") == 5);

  // The admin call refreshes the gateway's keys before answering: usable at once.
  auto first = client.post("/v1/chat/completions", key, chat_body("echo", "a b c"));
  REQUIRE(first.status == 200);
  CHECK(first.header("x-ratelimit-limit-requests") == "5");
  CHECK(first.header("x-ratelimit-remaining-requests") == "4");
  for (int i = 0; i < 2; ++i) CHECK(client.post("/v1/chat/completions", key, chat_body("echo", "a b c")).status == 200);
  CHECK(client.post("/v1/chat/completions", key, chat_body("other", "a b c")).status == 403);

  auto bad = client.post("/admin/keys", admin, R"({"models":["echo"]})");
  CHECK(bad.status == 400);
  check_openai_error(bad, "invalid_request_error");

  auto keys = client.get("/admin/keys", admin);
  REQUIRE(keys.status == 200);
  CHECK(keys.body.find(key.substr(11)) == std::string::npos);  // never the plaintext again
  bool listed = false;
  auto keys_body = keys.json();
  for (const auto& k : keys_body.at("data").as_array()) {
    if (k.at("prefix") != json::value(prefix_of(key))) continue;
    listed = true;
    CHECK(k.at("user") == "u");
    CHECK(k.at("models") == json::array{"echo"});
    CHECK(k.at("limits").at("requests_per_minute") == 5);
    CHECK(k.at("revoked_at").is_null());
  }
  CHECK(listed);

  auto users = client.get("/admin/users", admin);
  REQUIRE(users.status == 200);
  std::vector<std::string> names;
  auto users_body = users.json();
  for (const auto& u : users_body.at("data").as_array()) names.emplace_back(u.at("name").as_string());
  CHECK(names == std::vector<std::string>{"u"});

  auto quota = client.request("PUT", "/admin/users/u/quota", R"({"requests_per_day":100,"tokens_per_day":5000})",
                              {{"Authorization", "Bearer " + admin}});
  REQUIRE(quota.status == 200);
  CHECK(quota.json().at("limits").at("requests_per_day") == 100);
  CHECK(quota.json().at("limits").at("tokens_per_day") == 5000);
  CHECK(quota.json().at("limits").at("requests_per_minute").is_null());
  auto after_quota = client.get("/admin/users", admin);
  CHECK(after_quota.json().at("data").at(0).at("limits").at("requests_per_day") == 100);
  auto unknown_user = client.request("PUT", "/admin/users/nobody/quota", R"({"requests_per_day":1})",
                                     {{"Authorization", "Bearer " + admin}});
  CHECK(unknown_user.status == 404);

  auto unknown = client.request("DELETE", "/admin/keys/tg-NoSuchKey", "", {{"Authorization", "Bearer " + admin}});
  CHECK(unknown.status == 404);
  CHECK(error_code(unknown) == "key_not_found");
  auto revoke = client.request("DELETE", "/admin/keys/" + prefix_of(key), "", {{"Authorization", "Bearer " + admin}});
  REQUIRE(revoke.status == 200);
  CHECK(!revoke.json().at("revoked_at").is_null());
  auto refused = client.post("/v1/chat/completions", key, chat_body("echo", "a b c"));
  CHECK(refused.status == 401);
  CHECK(error_code(refused) == "revoked_api_key");
  auto unknown_prefix =
      client.request("DELETE", "/admin/keys/tg-nosuchkey", "", {{"Authorization", "Bearer " + admin}});
  CHECK(unknown_prefix.status >= 400);
  CHECK(unknown_prefix.status < 500);

  // Usage is written behind (flush_interval 100ms): poll until the rows are there.
  std::int64_t echo_requests = 0, echo_errors = -1, echo_prompt = 0, echo_completion = 0;
  std::int64_t other_requests = 0, other_errors = 0;
  json::value last;
  bool complete = eventually([&] {
    auto usage = client.get("/admin/usage?user=u&group_by=day,model", admin);
    if (usage.status != 200) return false;
    last = usage.json();
    echo_requests = echo_prompt = echo_completion = other_requests = other_errors = 0;
    echo_errors = 0;
    for (const auto& row : last.at("data").as_array()) {
      if (row.at("user") != "u") return false;
      if (!std::regex_match(std::string(row.at("day").as_string()), std::regex(R"(\d{4}-\d{2}-\d{2})"))) return false;
      const auto* model = row.as_object().if_contains("model");
      if (model && *model == "echo") {
        echo_requests += row.at("requests").as_int64();
        echo_errors += row.at("errors").as_int64();
        echo_prompt += row.at("prompt_tokens").as_int64();
        echo_completion += row.at("completion_tokens").as_int64();
      } else if (model && *model == "other") {
        other_requests += row.at("requests").as_int64();
        other_errors += row.at("errors").as_int64();
      }
    }
    return echo_requests == 3 && other_requests == 1;
  });
  INFO(json::serialize(last));
  CHECK(complete);
  CHECK(echo_requests == 3);
  CHECK(echo_errors == 0);
  CHECK(echo_prompt == 9);
  CHECK(echo_completion == 9);
  CHECK(other_requests == 1);
  CHECK(other_errors == 1);

  auto bad_query = client.get("/admin/usage?bogus=1", admin);
  CHECK(bad_query.status == 400);
  auto unknown_route = client.get("/admin/nothing", admin);
  CHECK(unknown_route.status == 404);
}

TEST_CASE("usage is complete after a graceful stop and readable by a second gateway", "[e2e][admin]") {
  TempDir dir;
  auto db = dir.file("shared.db");
  auto key = create_key(db, "dora");
  std::string admin;
  {
    GatewayProcess gw(dir, {.config_yaml = "", .db = db, .env = {}});
    admin = gw.admin_key();
    HttpClient client(gw.port());
    for (int i = 0; i < 3; ++i) REQUIRE(client.post("/v1/chat/completions", key, chat_body("echo", "x y")).status == 200);
    REQUIRE(gw.stop(SIGTERM) == 0);
  }
  GatewayProcess second(dir, {.config_yaml = "", .db = db, .env = {}});
  HttpClient client(second.port());
  auto usage = client.get("/admin/usage?user=dora", admin);
  REQUIRE(usage.status == 200);
  INFO(usage.body);
  auto rows = usage.json().at("data").as_array();
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].at("requests") == 3);
  CHECK(rows[0].at("prompt_tokens") == 6);
  CHECK(rows[0].at("completion_tokens") == 6);
  CHECK(rows[0].at("total_tokens") == 12);
  CHECK(!rows[0].as_object().contains("day"));
  CHECK(!rows[0].as_object().contains("model"));
}

TEST_CASE("CLI: keys list, users list and users limits", "[e2e][cli]") {
  TempDir dir;
  auto db = dir.file("cli.db");
  auto alice = create_key(db, "alice");
  auto bob = create_key(db, "bob", {"--models", "echo,other", "--rpm", "7", "--expires", "2999-12-31"});

  auto list = run_tollgate({"keys", "list", "--db", db});
  REQUIRE(list.exit_code == 0);
  auto alice_line = key_line(list.out, prefix_of(alice));
  auto bob_line = key_line(list.out, prefix_of(bob));
  REQUIRE(!alice_line.empty());
  REQUIRE(!bob_line.empty());
  CHECK(fields_of(alice_line).at(1) == "alice");
  CHECK(fields_of(alice_line).at(5) == "all");
  auto bob_fields = fields_of(bob_line);
  CHECK(bob_fields.at(1) == "bob");
  CHECK(bob_fields.at(3) == "2999-12-31");
  CHECK(bob_fields.at(4) == "-");
  CHECK(bob_fields.at(5) == "echo,other");
  CHECK(bob_line.find("rpm=7") != std::string::npos);
  CHECK(list.out.find(alice.substr(11)) == std::string::npos);

  auto only_alice = run_tollgate({"keys", "list", "--user", "alice", "--db", db});
  REQUIRE(only_alice.exit_code == 0);
  CHECK(!key_line(only_alice.out, prefix_of(alice)).empty());
  CHECK(key_line(only_alice.out, prefix_of(bob)).empty());

  REQUIRE(run_tollgate({"keys", "revoke", prefix_of(bob), "--db", db}).exit_code == 0);
  auto after = run_tollgate({"keys", "list", "--db", db});
  auto revoked_fields = fields_of(key_line(after.out, prefix_of(bob)));
  REQUIRE(revoked_fields.size() > 4);
  CHECK(revoked_fields.at(4) == tollgate::metering::day_string(tollgate::metering::now_ms()));
  // Revoking twice names the problem rather than pretending.
  auto twice = run_tollgate({"keys", "revoke", prefix_of(bob), "--db", db});
  INFO(twice.out << twice.err);
  CHECK(twice.exit_code != 0);

  auto users = run_tollgate({"users", "list", "--db", db});
  REQUIRE(users.exit_code == 0);
  std::vector<std::string> names;
  for (const auto& line : lines_of(users.out)) {
    auto f = fields_of(line);
    if (!f.empty() && f[0] != "USER") names.push_back(f[0]);
  }
  CHECK(names == std::vector<std::string>{"alice", "bob"});

  REQUIRE(run_tollgate({"users", "limits", "alice", "--rpd", "9", "--db", db}).exit_code == 0);
  auto limited = run_tollgate({"users", "list", "--db", db});
  bool shown = false;
  for (const auto& line : lines_of(limited.out)) {
    if (line.rfind("alice", 0) == 0) shown = line.find("rpd=9") != std::string::npos;
  }
  CHECK(shown);
}

TEST_CASE("CLI: usage reports requests and tokens per user, --json and --since", "[e2e][cli]") {
  TempDir dir;
  auto db = dir.file("usage.db");
  auto carol = create_key(db, "carol");
  auto dave = create_key(db, "dave");
  {
    GatewayProcess gw(dir, {.config_yaml = "", .db = db, .env = {}});
    HttpClient client(gw.port());
    for (int i = 0; i < 4; ++i) {
      REQUIRE(client.post("/v1/chat/completions", carol, chat_body("echo", "one two")).status == 200);
    }
    REQUIRE(client.post("/v1/chat/completions", carol, chat_body("echo", "x", R"("temperature":5)")).status == 400);
    REQUIRE(client.post("/v1/completions", dave, R"({"model":"echo","prompt":"p q r s t"})").status == 200);
    REQUIRE(gw.stop(SIGTERM) == 0);
  }

  auto report = run_tollgate({"usage", "--user", "carol", "--json", "--db", db});
  REQUIRE(report.exit_code == 0);
  INFO(report.out);
  auto rows = json::parse(report.out).at("data").as_array();
  REQUIRE(rows.size() == 1);
  CHECK(rows[0].at("user") == "carol");
  CHECK(rows[0].at("requests") == 5);
  CHECK(rows[0].at("errors") == 1);
  CHECK(rows[0].at("prompt_tokens") == 8);
  CHECK(rows[0].at("completion_tokens") == 8);
  CHECK(rows[0].at("total_tokens") == 16);

  auto everyone = run_tollgate({"usage", "--json", "--db", db});
  REQUIRE(everyone.exit_code == 0);
  auto all_rows = json::parse(everyone.out).at("data").as_array();
  REQUIRE(all_rows.size() == 2);
  CHECK(all_rows[1].at("user") == "dave");
  CHECK(all_rows[1].at("requests") == 1);
  CHECK(all_rows[1].at("prompt_tokens") == 5);

  auto by_day = run_tollgate({"usage", "--by-day", "--by-model", "--json", "--db", db});
  REQUIRE(by_day.exit_code == 0);
  auto by_day_body = json::parse(by_day.out);
  for (const auto& row : by_day_body.at("data").as_array()) {
    CHECK(row.as_object().contains("day"));
    // Requests refused before their model was read have none.
    const auto* model = row.as_object().if_contains("model");
    if (model) CHECK(*model == "echo");
    else CHECK(row.at("errors") == row.at("requests"));
  }

  auto since_past = run_tollgate({"usage", "--user", "carol", "--since", "2020-01-01", "--db", db});
  REQUIRE(since_past.exit_code == 0);
  bool carol_line = false;
  for (const auto& line : lines_of(since_past.out)) {
    auto f = fields_of(line);
    if (!f.empty() && f[0] == "carol") {
      carol_line = true;
      CHECK(f.at(3) == "5");
    }
  }
  CHECK(carol_line);

  auto tomorrow = tollgate::metering::day_string(tollgate::metering::now_ms() + 2 * 86'400'000);
  auto since_future = run_tollgate({"usage", "--user", "carol", "--since", tomorrow, "--json", "--db", db});
  REQUIRE(since_future.exit_code == 0);
  CHECK(json::parse(since_future.out).at("data").as_array().empty());

  auto bad_since = run_tollgate({"usage", "--since", "yesterday", "--db", db});
  CHECK(bad_since.exit_code == 2);
  CHECK(bad_since.err.find("--since") != std::string::npos);
}

TEST_CASE("CLI: errors exit non-zero with a message", "[e2e][cli]") {
  TempDir dir;
  auto db = dir.file("errors.db");
  create_key(db, "alice");

  auto unknown_prefix = run_tollgate({"keys", "revoke", "tg-nosuchprefix", "--db", db});
  CHECK(unknown_prefix.exit_code == 1);
  CHECK(unknown_prefix.err.find("tg-nosuchprefix") != std::string::npos);

  auto unknown_option = run_tollgate({"keys", "list", "--bogus", "1", "--db", db});
  CHECK(unknown_option.exit_code == 2);
  CHECK(unknown_option.err.find("--bogus") != std::string::npos);

  auto no_user = run_tollgate({"keys", "create", "--db", db});
  CHECK(no_user.exit_code == 2);
  CHECK(no_user.err.find("--user") != std::string::npos);

  auto bad_number = run_tollgate({"keys", "create", "--user", "x", "--rpm", "lots", "--db", db});
  CHECK(bad_number.exit_code == 2);
  CHECK(bad_number.err.find("--rpm") != std::string::npos);

  auto bad_date = run_tollgate({"keys", "create", "--user", "x", "--expires", "soon", "--db", db});
  CHECK(bad_date.exit_code == 2);
  CHECK(bad_date.err.find("--expires") != std::string::npos);

  auto unknown_command = run_tollgate({"frobnicate"});
  CHECK(unknown_command.exit_code == 2);
  CHECK(unknown_command.err.find("frobnicate") != std::string::npos);

  // None of the failures created anything.
  auto list = run_tollgate({"users", "list", "--db", db});
  REQUIRE(list.exit_code == 0);
  CHECK(list.out.find("\nx ") == std::string::npos);
}

TEST_CASE("every way a user name enters refuses a bad one with a clear message", "[e2e][admin][cli]") {
  TempDir dir;
  GatewayProcess gw(dir, {.config_yaml = kTwoModels, .db = "", .env = {}});
  const auto& admin = gw.admin_key();
  HttpClient client(gw.port());

  const std::vector<std::pair<std::string, std::string>> bad_names = {
      {"cr\rlf\ninjected", "control characters"},
      {std::string("nul\0byte", 8), "control characters"},
      {"del\x7f", "control characters"},
      {std::string(100'000, 'n'), "at most 128 bytes"},
      {std::string(129, 'n'), "at most 128 bytes"},
      {"", "empty"},
      {" padded ", "whitespace"},
      {"bad\xff utf8", "UTF-8"},
  };
  for (const auto& [name, says] : bad_names) {
    INFO("name of " << name.size() << " bytes, expecting '" << says << "'");
    // JSON cannot carry invalid UTF-8 (the body is refused as a whole); an argument can.
    if (says != "UTF-8") {
      const std::string name_json = json::serialize(json::string(name.data(), name.size()));
      auto user = client.post("/admin/users", admin, R"({"name":)" + name_json + "}");
      CHECK(user.status == 400);
      CHECK(user.body.find(says) != std::string::npos);
      CHECK(user.body.size() < 1000);  // the name is not echoed
      check_openai_error(user, "invalid_request_error");
      auto key = client.post("/admin/keys", admin, R"({"user":)" + name_json + "}");
      CHECK(key.status == 400);
      CHECK(key.body.find(says) != std::string::npos);
    }
    if (name.find('\0') == std::string::npos && !name.empty()) {
      auto cli_key = run_tollgate({"keys", "create", "--user", name, "--db", gw.db()});
      CHECK(cli_key.exit_code == 1);
      CHECK(cli_key.err.find(says) != std::string::npos);
      auto cli_limits = run_tollgate({"users", "limits", name, "--rpm", "1", "--db", gw.db()});
      CHECK(cli_limits.exit_code == 1);
      CHECK(cli_limits.err.find(says) != std::string::npos);
    }
  }
  // A name in a path is the same name: percent-encoded control characters are refused too.
  auto quota = client.request("PUT", "/admin/users/a%0Db/quota", R"({"requests_per_minute":1})",
                              {{"Authorization", "Bearer " + admin}, {"Content-Type", "application/json"}});
  CHECK(quota.status == 400);
  CHECK(quota.body.find("control characters") != std::string::npos);
  auto long_prefix =
      client.request("PATCH", "/admin/keys/tg-" + std::string(5000, 'p') + "/quota", R"({"requests_per_minute":1})",
                     {{"Authorization", "Bearer " + admin}, {"Content-Type", "application/json"}});
  CHECK(long_prefix.status == 400);
  CHECK(long_prefix.body.size() < 1000);
  auto long_model = client.post("/admin/keys", admin, R"({"user":"ok","models":[")" + std::string(300, 'm') + R"("]})");
  CHECK(long_model.status == 400);
  CHECK(long_model.body.find("at most 256 bytes") != std::string::npos);

  // Good names still work everywhere, and nothing bad reached the table.
  CHECK(client.post("/admin/users", admin, R"({"name":"Jürgen Müller"})").status == 201);
  CHECK(run_tollgate({"users", "limits", "svc:billing@prod", "--rpm", "3", "--db", gw.db()}).exit_code == 0);
  auto list = run_tollgate({"users", "list", "--db", gw.db()});
  REQUIRE(list.exit_code == 0);
  auto rows = query_rows(gw.db(), "SELECT name FROM users ORDER BY name");
  REQUIRE(rows.size() == 2);
  CHECK(*rows[0][0] == "Jürgen Müller");
  CHECK(*rows[1][0] == "svc:billing@prod");
  CHECK(list.out.find('\r') == std::string::npos);
  CHECK(std::count(list.out.begin(), list.out.end(), '\n') == 3);  // a header and two users
}

TEST_CASE("a key created with the CLI works on the very first request to a running gateway", "[e2e][keys][auth]") {
  TempDir dir;
  GatewayProcess gw(dir, {.config_yaml = kTwoModels, .db = "", .env = {}});
  HttpClient client(gw.port());
  for (int i = 0; i < 6; ++i) {
    INFO("key " << i);
    // No wait_for_key: the gateway must look an unknown key up before refusing it.
    auto key = create_key(gw.db(), "quickstart-" + std::to_string(i));
    auto r = client.post("/v1/chat/completions", key, chat_body("echo", "first try"));
    CHECK(r.status == 200);
    auto other = i % 2 ? client.get("/v1/models", create_key(gw.db(), "models-" + std::to_string(i)))
                       : client.request("GET", "/v1/models", "", {{"x-api-key", create_key(gw.db(), "x")}});
    CHECK(other.status == 200);
  }
}

TEST_CASE("a burst of random keys is refused quickly while real keys keep being served", "[e2e][keys][auth]") {
  TempDir dir;
  GatewayProcess gw(dir, {.config_yaml = kTwoModels, .db = "", .env = {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);

  constexpr int kThreads = 10, kEach = 50;  // 500 random keys
  std::vector<int> refused(kThreads, 0);
  std::vector<std::string> errors(kThreads);
  auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        HttpClient attacker(gw.port());
        for (int i = 0; i < kEach; ++i) {
          auto random_key = "tg-random" + std::to_string(t) + "x" + std::to_string(i) + "abcdefghijklmnop";
          if (attacker.post("/v1/chat/completions", random_key, chat_body("echo", "hi")).status == 401) ++refused[t];
        }
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  }
  // Meanwhile a real key is served without waiting on the refusals.
  int served = 0;
  std::chrono::steady_clock::duration slowest{};
  std::thread user([&] {
    HttpClient client(gw.port());
    for (int i = 0; i < 20; ++i) {
      auto before = std::chrono::steady_clock::now();
      if (client.post("/v1/chat/completions", key, chat_body("echo", "still served")).status == 200) ++served;
      slowest = std::max(slowest, std::chrono::steady_clock::now() - before);
    }
  });
  for (auto& th : threads) th.join();
  auto took = std::chrono::steady_clock::now() - started;
  user.join();

  for (int t = 0; t < kThreads; ++t) {
    INFO(errors[t]);
    CHECK(errors[t].empty());
    CHECK(refused[t] == kEach);
  }
  // Each miss waits at most one refresh interval (50 ms) plus the refresh itself.
  CHECK(took < std::chrono::seconds(kEach / 5));
  CHECK(served == 20);
  CHECK(slowest < 1s);
  CHECK(gw.running());
}
