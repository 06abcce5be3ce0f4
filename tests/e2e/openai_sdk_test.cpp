// The official `openai` npm package against the real binary: the client most
// users will point at Tollgate (tests/sdk/openai_sdk_test.mjs does the calls).
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness.hpp"
#include "upstream.hpp"

using namespace tollgate::test;

namespace {

// Runs one SDK script against the gateway on `port`; returns its output.
std::string run_sdk_script(const TempDir& dir, const std::string& script, std::uint16_t port, const std::string& env,
                           int& status) {
  std::string sdk_dir = std::string(TOLLGATE_SOURCE_DIR) + "/tests/sdk";
  auto out = dir.file(script + ".out");
  std::string command = "cd '" + sdk_dir + "' && TOLLGATE_BASE_URL=http://127.0.0.1:" + std::to_string(port) + "/v1 " +
                        env + " timeout 120 node " + script + " > '" + out + "' 2>&1";
  status = std::system(command.c_str());
  std::stringstream text;
  text << std::ifstream(out).rdbuf();
  return text.str();
}

}  // namespace

TEST_CASE("the OpenAI Node SDK works against Tollgate, errors as its typed errors", "[e2e][sdk]") {
  INFO("run scripts/install-deps.sh to install the SDK into tests/sdk/node_modules");
  REQUIRE(std::filesystem::exists(std::string(TOLLGATE_SOURCE_DIR) + "/tests/sdk/node_modules/openai/package.json"));

  TempDir dir;
  GatewayProcess gw(dir);
  // Made first: once the gateway knows the later key it knows this one, and
  // waiting on it would spend its one request.
  auto limited = create_key(gw.db(), "sdk-limited", {"--rpm", "1"});
  auto key = create_key(gw.db(), "sdk-user");
  wait_for_key(gw.port(), key);

  int status = 0;
  auto text = run_sdk_script(dir, "openai_sdk_test.mjs", gw.port(),
                             "TOLLGATE_KEY=" + key + " TOLLGATE_LIMITED_KEY=" + limited, status);
  INFO(text);
  CHECK(status == 0);
  CHECK(text.find("all passed") != std::string::npos);
  CHECK(text.find("ok rateLimitError") != std::string::npos);
}

TEST_CASE("the OpenAI Node SDK through Tollgate to a remote upstream: tools, logprobs, embeddings", "[e2e][sdk]") {
  REQUIRE(std::filesystem::exists(std::string(TOLLGATE_SOURCE_DIR) + "/tests/sdk/node_modules/openai/package.json"));
  TempDir dir;
  FakeOpenAI fake;
  GatewayProcess::Options o;
  o.config_yaml = "backends:\n  - {name: up, type: openai, base_url: 'http://127.0.0.1:" + std::to_string(fake.port()) +
                  "/v1'}\nmodels:\n  - {name: m-tools, deployments: [{backend: up, model: tools}]}\n"
                  "  - {name: m-normal, deployments: [{backend: up, model: normal}]}\n";
  GatewayProcess gw(dir, o);
  auto key = create_key(gw.db(), "sdk-user");
  wait_for_key(gw.port(), key);
  int status = 0;
  auto text = run_sdk_script(dir, "openai_sdk_upstream_test.mjs", gw.port(), "TOLLGATE_KEY=" + key, status);
  INFO(text);
  CHECK(status == 0);
  CHECK(text.find("all passed") != std::string::npos);
  CHECK(text.find("ok embeddings") != std::string::npos);
  CHECK(fake.last().at("path") == "/v1/embeddings");  // the last call reached the upstream
}
