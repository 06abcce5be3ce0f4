// The app reverse proxy's configuration keys.
#include <catch2/catch.hpp>

#include "gateway/config.hpp"

using namespace std::chrono_literals;
using tollgate::gateway::ConfigError;
using tollgate::gateway::parse_config;

namespace {

std::string app_config_error(const std::string& yaml) {
  try {
    parse_config(yaml, "app.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("app_upstream, app_timeouts, public_paths and trusted_proxies parse", "[gateway][config][app_proxy]") {
  auto c = parse_config(
      "app_upstream: http://app.internal:8081/\n"
      "app_timeouts: {connect: 500ms, first_byte: 30s, idle: 2m}\n"
      "public_paths: [/actuator/health, /static/*]\n"
      "trusted_proxies: [127.0.0.1, '::1']\n",
      "app.yaml");
  REQUIRE(c.app_upstream);
  CHECK(c.app_upstream->host == "app.internal");
  CHECK(c.app_upstream->port == 8081);
  CHECK(c.app_upstream->connect_timeout == 500ms);
  CHECK(c.app_upstream->first_byte_timeout == 30s);
  CHECK(c.app_upstream->idle_timeout == 120s);
  CHECK(c.public_paths == std::vector<std::string>{"/actuator/health", "/static/*"});
  CHECK(c.trusted_proxies == std::vector<std::string>{"127.0.0.1", "::1"});

  auto defaults = parse_config("app_upstream: http://127.0.0.1\n", "app.yaml");
  REQUIRE(defaults.app_upstream);
  CHECK(defaults.app_upstream->port == 80);
  CHECK(defaults.app_upstream->connect_timeout == 2s);
  CHECK(defaults.app_upstream->first_byte_timeout == 60s);
  CHECK(defaults.app_upstream->idle_timeout == 60s);
  CHECK_FALSE(parse_config("listen: 127.0.0.1:1\n", "app.yaml").app_upstream);
}

TEST_CASE("app proxy settings are validated, naming the key", "[gateway][config][app_proxy]") {
  CHECK(contains(app_config_error("app_upstream: https://x:1"), "app_upstream: expected http://HOST:PORT"));
  CHECK(contains(app_config_error("app_upstream: http://x:1/prefix"), "app_upstream: a path prefix is not supported"));
  CHECK(contains(app_config_error("app_upstream: http://x:notaport"), "app_upstream: expected http://HOST:PORT"));
  CHECK(contains(app_config_error("app_timeouts: {idle: 1s}"), "app_timeouts: needs app_upstream"));
  CHECK(contains(app_config_error("app_upstream: http://x:1\napp_timeouts: {idel: 1s}"),
                 "app_timeouts: unknown key 'idel'"));
  CHECK(contains(app_config_error("app_upstream: http://x:1\napp_timeouts: {connect: 0ms}"), "must be positive"));
  CHECK(contains(app_config_error("public_paths: [health]"), "public_paths[0]: must start with '/'"));
  CHECK(contains(app_config_error("public_paths: [/a/*/b]"), "'*' is only allowed at the end"));
  CHECK(contains(app_config_error("public_paths: /a"), "public_paths: expected a list"));
  CHECK(contains(app_config_error("trusted_proxies: [10.0.0.0/8]"), "trusted_proxies[0]: expected an IP address"));
}
