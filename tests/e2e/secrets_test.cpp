// Canary credentials through every failure path: the provider's key and a
// credential in its headers, a real client key, an unknown client key and the
// admin key never show up in what clients receive, the gateway's log,
// /metrics, or the bytes of the SQLite files.
#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness.hpp"
#include "upstream.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

const std::string kProviderKey = "sk-canary-provider-7f3a9c1e5b2d40680a1b";
const std::string kHeaderSecret = "hdr-canary-secret-91b2c3d4e5f6a7b8";
const std::string kUnknownKey = "tg-CanaryUnknownKey0000000000000001";  // a Tollgate key's shape, in no store
const std::string kAdminKey = "tg-admin-CanaryAdminKey000000000000000002";

// The models whose upstream behaviour (fake_openai.py) the test goes through.
const std::vector<std::string> kModels = {"normal",       "die",         "leak-400",    "leak-404",
                                          "leak-429",     "leak-500",    "leakraw-503", "leak-200",
                                          "leak-badjson", "leak-stream", "longline",    "longline-first"};

std::string canary_config(std::uint16_t port) {
  std::string url = "http://127.0.0.1:" + std::to_string(port) + "/v1";
  std::string credentials =
      "    api_key: ${CANARY_PROVIDER_KEY}\n"
      "    headers: {X-Org-Secret: '${CANARY_HEADER_SECRET}'}\n";
  std::string yaml =
      "backends:\n"
      "  - name: up\n"
      "    type: openai\n"
      "    base_url: " +
      url + "\n" + credentials +
      "    timeouts: {connect: 5s, first_byte: 20s, idle: 20s, total: 60s}\n"
      "  - name: up-impatient\n"
      "    type: openai\n"
      "    base_url: " +
      url + "\n" + credentials +
      "    timeouts: {first_byte: 1s}\n"
      "models:\n";
  for (const auto& m : kModels) yaml += "  - {name: m-" + m + ", deployments: [{backend: up, model: '" + m + "'}]}\n";
  yaml += "  - {name: m-hang, deployments: [{backend: up-impatient, model: hang}]}\n";
  return yaml;
}

GatewayProcess::Options canary_options(std::uint16_t port) {
  GatewayProcess::Options o;
  o.config_yaml = canary_config(port);
  o.env = {{"CANARY_PROVIDER_KEY", kProviderKey},
           {"CANARY_HEADER_SECRET", kHeaderSecret},
           {"TOLLGATE_ADMIN_KEY", kAdminKey}};
  return o;
}

std::string stream_body(const std::string& model) {
  return R"({"model":")" + model + R"(","stream":true,"messages":[{"role":"user","content":"hi"}]})";
}

// Everything a client received: status, every header, the body.
std::string as_text(const HttpResponse& r) {
  std::string text = std::to_string(r.status) + "\n";
  for (const auto& [name, value] : r.headers) text += name + ": " + value + "\n";
  return text + "\n" + r.body + "\n";
}

std::size_t occurrences(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = haystack.find(needle); at != std::string::npos; at = haystack.find(needle, at + 1)) ++n;
  return n;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The message of the JSON error in `r`'s body, or of the SSE error event in it.
std::string error_message(const HttpResponse& r) {
  if (r.header("content-type").starts_with("text/event-stream")) {
    for (const auto& data : sse_data(r.body)) {
      if (data == "[DONE]") continue;
      auto v = json::parse(data).as_object();
      if (auto* e = v.if_contains("error")) return std::string(e->at("message").as_string());
    }
    return "";
  }
  return std::string(r.json().at("error").at("message").as_string());
}

}  // namespace

TEST_CASE("secrets: canary keys leave no trace in responses, the log, /metrics or the database", "[e2e][secrets]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, canary_options(fake.port()));
  const std::string client_key = create_key(gw.db(), "canary-user");
  wait_for_key(gw.port(), client_key);
  const std::vector<std::pair<std::string, std::string>> canaries = {{"provider key", kProviderKey},
                                                                     {"provider header secret", kHeaderSecret},
                                                                     {"client key", client_key},
                                                                     {"unknown client key", kUnknownKey},
                                                                     {"admin key", kAdminKey}};
  std::string received;
  // Each call on a fresh connection: a failure may close the one it came on.
  auto post = [&](const std::string& key, const std::string& body, const Headers& extra = {}) {
    HttpClient client(gw.port(), 30s);
    Headers headers = {{"Authorization", "Bearer " + key}};
    headers.insert(headers.end(), extra.begin(), extra.end());
    auto r = client.request("POST", "/v1/chat/completions", body, headers);
    received += as_text(r);
    return r;
  };

  // The provider's credentials really go upstream, so finding them nowhere else means something.
  auto r = post(client_key, chat_body("m-normal", "hello"));
  CHECK(r.status == 200);
  auto last = fake.last().as_object();
  CHECK(last.at("headers").at("authorization") == json::value("Bearer " + kProviderKey));
  CHECK(last.at("headers").at("x-org-secret") == json::value(kHeaderSecret));

  // Bad JSON, with the key in both places a client may put it.
  r = post(client_key, R"({"model": "m-normal", "messages": [)", {{"X-Api-Key", client_key}});
  CHECK(r.status == 400);

  // Upstream errors that quote the request's headers, key and header secret among them.
  struct Quoting {
    std::string model;
    int status;
  };
  for (const auto& [model, status] : std::vector<Quoting>{{"m-leak-400", 400},
                                                          {"m-leak-404", 404},
                                                          {"m-leak-429", 429},
                                                          {"m-leak-500", 502},
                                                          {"m-leakraw-503", 502},
                                                          {"m-leak-200", 502}}) {
    r = post(client_key, chat_body(model, "hi"));
    INFO(model << ": " << r.body);
    CHECK(r.status == status);
    auto message = error_message(r);
    CHECK(message.find("***") != std::string::npos);  // the quote arrived, masked
    CHECK(message.find(kProviderKey.substr(0, 12)) == std::string::npos);
    // The key as the upstream error's code and param: relayed on a 400, masked too.
    CHECK(r.body.find(kProviderKey.substr(0, 12)) == std::string::npos);
    if (status == 400) CHECK(r.json().at("error").at("code") == "***");
  }
  // The quoted headers' names survive: the quote was relayed, not dropped.
  CHECK(received.find("x-org-secret") != std::string::npos);
  r = post(client_key, chat_body("m-leak-badjson", "hi"));
  CHECK(r.status == 502);

  // Mid-stream: the status is already 200, so an error event.
  r = post(client_key, stream_body("m-leak-stream"));
  CHECK(r.status == 200);
  CHECK(error_message(r).find("***") != std::string::npos);
  r = post(client_key, stream_body("m-die"));
  CHECK(r.status == 200);
  CHECK_FALSE(error_message(r).empty());

  r = post(client_key, chat_body("m-hang", "hi"));
  CHECK(r.status == 504);
  r = post(client_key, stream_body("m-longline"));
  CHECK(r.status == 200);
  CHECK(error_message(r).find("larger than") != std::string::npos);
  r = post(client_key, stream_body("m-longline-first"));
  CHECK(r.status == 502);

  r = post(client_key, chat_body("no-such-model", "hi"));
  CHECK(r.status == 404);
  // Keys the gateway does not know, the provider's pasted in by mistake among them.
  r = post(kUnknownKey, chat_body("m-normal", "hi"));
  CHECK(r.status == 401);
  r = post(kProviderKey, chat_body("m-normal", "hi"), {{"X-Api-Key", kHeaderSecret}});
  CHECK(r.status == 401);
  r = post(kAdminKey, chat_body("m-normal", "hi"));  // the admin key is no client key
  CHECK(r.status == 401);
  {
    HttpClient client(gw.port());
    auto keys = client.get("/admin/keys", kAdminKey);
    CHECK(keys.status == 200);
    CHECK(keys.body.find("canary-user") != std::string::npos);
    received += as_text(keys);
    auto refused = client.get("/admin/keys", kUnknownKey);
    CHECK(refused.status == 401);
    received += as_text(refused);
  }

  HttpClient metrics_client(gw.port());
  auto metrics = metrics_client.get("/metrics").body;
  // The right text was read: the failures above are counted in it.
  CHECK(metrics.find(R"(tollgate_backend_errors_total{backend="up",kind="upstream_failed"})") != std::string::npos);

  // Every call above is metered; a graceful stop then flushes everything to the files.
  CHECK(wait_usage_rows(gw.db(), "model='m-longline-first' AND status=502", 1) == 1);
  REQUIRE(gw.stop(SIGTERM) == 0);
  std::string db_bytes = read_bytes(gw.db());
  if (std::filesystem::exists(gw.db() + "-wal")) db_bytes += read_bytes(gw.db() + "-wal");
  // The bytes are the store's: the user and the key's display prefix are in them.
  CHECK(db_bytes.find("canary-user") != std::string::npos);
  CHECK(db_bytes.find(client_key.substr(0, 11)) != std::string::npos);
  const std::string log = gw.log();
  CHECK(log.find("listening on") != std::string::npos);

  for (const auto& [what, canary] : canaries) {
    INFO(what << ": " << canary);
    CHECK(occurrences(received, canary) == 0);
    CHECK(occurrences(log, canary) == 0);
    CHECK(occurrences(metrics, canary) == 0);
    CHECK(occurrences(db_bytes, canary) == 0);
  }
}

TEST_CASE("secrets: a mid-stream error event quoting the provider key arrives scrubbed", "[e2e][secrets][openai]") {
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess gw(dir, canary_options(fake.port()));
  const std::string key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  auto r = client.post("/v1/chat/completions", key, stream_body("m-leak-stream"));
  REQUIRE(r.status == 200);
  CHECK(fake.last().at("headers").at("authorization") == json::value("Bearer " + kProviderKey));

  std::string text;
  std::string message;
  bool done = false;
  for (const auto& data : sse_data(r.body)) {
    if (data == "[DONE]") {
      done = true;
      continue;
    }
    auto v = json::parse(data).as_object();
    if (auto* e = v.if_contains("error")) {
      message = e->at("message").as_string().c_str();
      continue;
    }
    auto& choices = v.at("choices").as_array();
    if (choices.empty()) continue;
    if (auto* t = choices[0].at("delta").as_object().if_contains("content")) text += t->as_string().c_str();
  }
  CHECK(text == "Hello from");
  CHECK_FALSE(done);
  INFO(message);
  // The upstream's words come through, its quote of our headers masked.
  CHECK(message.find("the upstream failed mid-stream: denied: the request headers were") == 0);
  CHECK(message.find(R"("authorization": "Bearer ***")") != std::string::npos);
  CHECK(message.find(R"("x-org-secret": "***")") != std::string::npos);
  CHECK(r.body.find(kProviderKey) == std::string::npos);
  CHECK(r.body.find(kHeaderSecret) == std::string::npos);
  CHECK(r.body.find(kProviderKey.substr(0, 12)) == std::string::npos);
  CHECK(gw.log().find(kProviderKey) == std::string::npos);
}
