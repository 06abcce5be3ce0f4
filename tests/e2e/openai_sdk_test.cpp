// The official `openai` npm package against the real binary: the client most
// users will point at Tollgate (tests/sdk/openai_sdk_test.mjs does the calls).
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness.hpp"

using namespace tollgate::test;

TEST_CASE("the OpenAI Node SDK works against Tollgate, errors as its typed errors", "[e2e][sdk]") {
  std::string sdk_dir = std::string(TOLLGATE_SOURCE_DIR) + "/tests/sdk";
  INFO("run scripts/install-deps.sh to install the SDK into tests/sdk/node_modules");
  REQUIRE(std::filesystem::exists(sdk_dir + "/node_modules/openai/package.json"));

  TempDir dir;
  GatewayProcess gw(dir);
  // Made first: once the gateway knows the later key it knows this one, and
  // waiting on it would spend its one request.
  auto limited = create_key(gw.db(), "sdk-limited", {"--rpm", "1"});
  auto key = create_key(gw.db(), "sdk-user");
  wait_for_key(gw.port(), key);

  auto out = dir.file("sdk.out");
  std::string command = "cd '" + sdk_dir + "' && TOLLGATE_BASE_URL=http://127.0.0.1:" + std::to_string(gw.port()) +
                        "/v1 TOLLGATE_KEY=" + key + " TOLLGATE_LIMITED_KEY=" + limited +
                        " timeout 120 node openai_sdk_test.mjs > '" + out + "' 2>&1";
  int status = std::system(command.c_str());
  std::stringstream text;
  text << std::ifstream(out).rdbuf();
  INFO(text.str());
  CHECK(status == 0);
  CHECK(text.str().find("all passed") != std::string::npos);
  CHECK(text.str().find("ok rateLimitError") != std::string::npos);
}
