#include "gateway/config.hpp"

#include <catch2/catch.hpp>
#include <cstdlib>

#include "backends/echo.hpp"
#include "backends/local.hpp"

using namespace std::chrono_literals;
using tollgate::backends::EchoConfig;
using tollgate::backends::LocalBackendConfig;
using tollgate::gateway::Config;
using tollgate::gateway::ConfigError;
using tollgate::gateway::parse_config;
using tollgate::gateway::parse_listen;

namespace {

// The message parse_config throws for `yaml`, or "" when it parses.
std::string config_error(const std::string& yaml) {
  try {
    parse_config(yaml, "test.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("parse_config reads every key", "[gateway][config]") {
  auto c = parse_config(R"(
listen: 0.0.0.0:9090
database: /var/lib/tollgate/t.db
io_threads: 3
limits:
  max_body: 2MiB
  max_header: 8KiB
  header_timeout: 5s
  body_timeout: 45s
  idle_timeout: 2m
  shutdown_grace: 1500ms
  max_connections: 123
metering:
  flush_interval: 250ms
  per_user_metrics: true
  default_reserve_tokens: 77
backends:
  - name: fast
    type: echo
  - {name: slow, type: echo, token_delay: 50ms}
models:
  - name: small
    deployments: [{backend: fast}]
  - name: big
    deployments:
      - {backend: slow, model: big-upstream}
      - {backend: fast}
)",
                        "full.yaml");
  CHECK(c.listen.host == "0.0.0.0");
  CHECK(c.listen.port == 9090);
  CHECK(c.database == "/var/lib/tollgate/t.db");
  CHECK(c.io_threads == 3);
  CHECK(c.limits.max_body == 2 * 1024 * 1024);
  CHECK(c.limits.max_header == 8 * 1024);
  CHECK(c.limits.header_timeout == 5s);
  CHECK(c.limits.body_timeout == 45s);
  CHECK(c.limits.idle_timeout == 2min);
  CHECK(c.limits.shutdown_grace == 1500ms);
  CHECK(c.limits.max_connections == 123);
  CHECK(c.metering.flush_interval == 250ms);
  CHECK(c.metering.per_user_metrics);
  CHECK(c.metering.default_reserve_tokens == 77);
  REQUIRE(c.backends.size() == 2);
  CHECK(c.backends[0].name == "fast");
  CHECK(c.backends[0].type == "echo");
  const auto* fast = c.backends[0].spec->as<EchoConfig>();
  REQUIRE(fast);
  CHECK(fast->name == "fast");
  CHECK(fast->token_delay == 0ms);
  CHECK(c.backends[1].name == "slow");
  REQUIRE(c.backends[1].spec->as<EchoConfig>());
  CHECK(c.backends[1].spec->as<EchoConfig>()->token_delay == 50ms);
  REQUIRE(c.models.size() == 2);
  CHECK(c.models[0].name == "small");
  REQUIRE(c.models[0].deployments.size() == 1);
  CHECK(c.models[0].deployments[0].backend == "fast");
  CHECK(c.models[0].deployments[0].model == "small");  // defaults to the public name
  REQUIRE(c.models[1].deployments.size() == 2);
  CHECK(c.models[1].deployments[0].backend == "slow");
  CHECK(c.models[1].deployments[0].model == "big-upstream");
  CHECK(c.models[1].deployments[1].model == "big");
}

TEST_CASE("parse_config defaults", "[gateway][config]") {
  Config defaults;
  for (const std::string yaml : {"", "# only a comment\n", "limits: {}\nmetering: {}\n"}) {
    auto c = parse_config(yaml, "empty.yaml");
    CHECK(c.listen.host == defaults.listen.host);
    CHECK(c.listen.port == 8080);
    CHECK(c.database == "./tollgate.db");
    CHECK(c.io_threads == 0);
    CHECK(c.limits.max_body == 4 * 1024 * 1024);
    CHECK(c.limits.header_timeout == 10s);
    CHECK(c.metering.flush_interval == 1s);
    CHECK_FALSE(c.metering.per_user_metrics);
    CHECK(c.backends.empty());
    CHECK(c.models.empty());
  }
  for (const std::string word : {"yes", "on", "true"}) {
    CHECK(parse_config("metering: {per_user_metrics: " + word + "}", "t").metering.per_user_metrics);
  }
  for (const std::string word : {"no", "off", "false"}) {
    CHECK_FALSE(parse_config("metering: {per_user_metrics: " + word + "}", "t").metering.per_user_metrics);
  }
}

TEST_CASE("the embedded default configuration parses and serves echo and the local demo model", "[gateway][config]") {
  auto c = tollgate::gateway::embedded_default_config();
  CHECK(c.listen.host == "127.0.0.1");
  CHECK(c.listen.port == 8080);
  REQUIRE(c.backends.size() == 2);
  CHECK(c.backends[0].type == "echo");
  CHECK(c.backends[1].type == "local");
  const auto* local = c.backends[1].spec->as<LocalBackendConfig>();
  REQUIRE(local);
  CHECK(local->create_demo);
  CHECK(local->model_path == "./tollgate-demo.gguf");
  REQUIRE(c.models.size() == 2);
  CHECK(c.models[0].name == "echo");
  CHECK(c.models[1].name == "demo");
  CHECK_NOTHROW(parse_config(tollgate::gateway::embedded_default_yaml(), "again"));
}

TEST_CASE("a local backend's engine settings are read and checked", "[gateway][config]") {
  auto c = parse_config(
      "backends: [{name: l, type: local, path: /m.gguf, tokenizer: /t.bin, device: cpu, max_num_seqs: 4,\n"
      "            max_num_batched_tokens: 256, max_model_len: 1024, kv_cache: 64MiB, block_size: 32, max_waiting: 9,\n"
      "            threads: 2}]",
      "test.yaml");
  REQUIRE(c.backends.size() == 1);
  CHECK_FALSE(c.backends[0].spec->as<EchoConfig>());
  const auto* b = c.backends[0].spec->as<LocalBackendConfig>();
  REQUIRE(b);
  CHECK(b->name == "l");
  CHECK(b->model_path == "/m.gguf");
  CHECK(b->tokenizer_path == "/t.bin");
  CHECK(b->device == "cpu");
  CHECK(b->engine.max_num_seqs == 4);
  CHECK(b->engine.max_num_batched_tokens == 256);
  CHECK(b->engine.max_model_len == 1024);
  CHECK(b->engine.kv_cache_bytes == 64 * 1024 * 1024);
  CHECK(b->engine.block_size == 32);
  CHECK(b->engine.max_waiting == 9);
  CHECK(b->engine.threads == 2);
  CHECK(b->engine.prefix_caching);
  CHECK_FALSE(b->create_demo);
  CHECK(contains(config_error("backends: [{name: l, type: local}]"), "missing key 'path'"));
  CHECK(contains(config_error("backends: [{name: l, type: local, path: x, device: tpu}]"),
                 "expected auto, cpu, cuda or cuda-emulated"));
  CHECK(contains(config_error("backends: [{name: l, type: local, path: x, max_num_seqs: 0}]"), "max_num_seqs"));
  CHECK(contains(config_error("backends: [{name: l, type: local, path: x, max_num_seq: 2}]"), "unknown key 'max_num_seq'"));
}

TEST_CASE("unknown keys are errors that name the key and where it is", "[gateway][config]") {
  auto top = config_error("listen: 127.0.0.1:1\nlistenn: 1\n");
  CHECK(contains(top, "test.yaml"));
  CHECK(contains(top, "unknown key 'listenn'"));
  CHECK(contains(top, "known keys:"));
  CHECK(contains(top, "database"));

  auto limits = config_error("limits: {max_body: 1MiB, max_bodyy: 2MiB}");
  CHECK(contains(limits, "limits: unknown key 'max_bodyy'"));
  CHECK(contains(limits, "max_header"));

  CHECK(contains(config_error("metering: {flush: 1s}"), "metering: unknown key 'flush'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo, token_dealy: 5ms}]"),
                 "backends[0]: unknown key 'token_dealy'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{name: m, deployment: []}]"),
                 "models[0]: unknown key 'deployment'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\n"
                              "models: [{name: m, deployments: [{backend: e}, {backend: e, modle: x}]}]"),
                 "models[0].deployments[1]: unknown key 'modle'"));
}

TEST_CASE("a complex key is a ConfigError, not yaml-cpp's", "[gateway][config]") {
  // Found by tests/fuzz/yaml_config_fuzz: "? routing:" made yaml-cpp throw a bad conversion.
  CHECK(contains(config_error("? routing:\n"), "test.yaml: expected plain keys"));
  CHECK(contains(config_error("limits: {? [a]: 1}"), "test.yaml: limits: expected plain keys"));
}

TEST_CASE("invalid values are errors naming the key", "[gateway][config]") {
  CHECK(contains(config_error("listen: nowhere"), "listen: expected HOST:PORT"));
  CHECK(contains(config_error("listen: [a, b]"), "listen: expected a single value"));
  CHECK(contains(config_error("database: ''"), "database: must not be empty"));
  CHECK(contains(config_error("io_threads: many"), "io_threads: expected an integer, got 'many'"));
  CHECK(contains(config_error("io_threads: 300"), "io_threads: must be between 0 and 256"));
  CHECK(contains(config_error("io_threads: -1"), "io_threads: must be between"));
  CHECK(contains(config_error("io_threads: 2x"), "io_threads: expected an integer"));
  CHECK(contains(config_error("limits: {max_body: big}"), "limits.max_body: expected a size"));
  CHECK(contains(config_error("limits: {max_header: 512}"), "limits.max_header: must be at least 1KiB"));
  CHECK(contains(config_error("limits: {header_timeout: 10}"), "limits.header_timeout: expected a duration"));
  CHECK(contains(config_error("limits: {max_connections: 0}"), "limits.max_connections: must be between"));
  CHECK(contains(config_error("limits: 5"), "limits: expected a mapping"));
  CHECK(contains(config_error("metering: {flush_interval: 0s}"), "metering.flush_interval: must be positive"));
  CHECK(contains(config_error("metering: {per_user_metrics: maybe}"),
                 "metering.per_user_metrics: expected true or false, got 'maybe'"));
  CHECK(contains(config_error("metering: {default_reserve_tokens: -5}"), "metering.default_reserve_tokens"));
  CHECK(contains(config_error("backends: {name: e}"), "backends: expected a list"));
  CHECK(contains(config_error("backends: [{name: e}]"), "backends[0]: missing key 'type'"));
  CHECK(contains(config_error("backends: [{type: echo}]"), "backends[0]: missing key 'name'"));
  CHECK(contains(config_error("backends: [{name: e, type: magic}]"),
                 "backends[0].type: unknown backend type 'magic' (known types: echo, openai, local, runpod)"));
  CHECK(contains(config_error("backends: [{name: e, type: echo, token_delay: slow}]"),
                 "backends[0].token_delay: expected a duration"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}, {name: e, type: echo}]"),
                 "backend 'e' is defined twice"));
  CHECK(contains(config_error("models: {}"), "models: expected a list"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{deployments: [{backend: e}]}]"),
                 "models[0]: missing key 'name'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{name: m}]"),
                 "models[0].deployments: expected a non-empty list"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{name: m, deployments: []}]"),
                 "models[0].deployments: expected a non-empty list"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{name: m, deployments: [{model: x}]}]"),
                 "models[0].deployments[0]: missing key 'backend'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\nmodels: [{name: m, deployments: [{backend: f}]}]"),
                 "model 'm' names unknown backend 'f'"));
  CHECK(contains(config_error("backends: [{name: e, type: echo}]\n"
                              "models: [{name: m, deployments: [{backend: e}]}, {name: m, deployments: [{backend: e}]}]"),
                 "model 'm' is defined twice"));
  CHECK(contains(config_error("listen: [unclosed"), "test.yaml: invalid YAML"));
  CHECK(contains(config_error("- just\n- a list\n"), "expected a mapping"));
}

TEST_CASE("parse_listen", "[gateway][config]") {
  auto v4 = parse_listen("127.0.0.1:8080");
  REQUIRE(v4);
  CHECK(v4->host == "127.0.0.1");
  CHECK(v4->port == 8080);
  auto v6 = parse_listen("[::1]:9000");
  REQUIRE(v6);
  CHECK(v6->host == "::1");
  CHECK(v6->port == 9000);
  auto any = parse_listen(":8081");
  REQUIRE(any);
  CHECK(any->host == "0.0.0.0");
  CHECK(any->port == 8081);
  auto zero = parse_listen("localhost:0");
  REQUIRE(zero);
  CHECK(zero->host == "localhost");
  CHECK(zero->port == 0);
  CHECK(parse_listen("0.0.0.0:65535")->port == 65535);
  CHECK_FALSE(parse_listen("localhost"));
  CHECK_FALSE(parse_listen("localhost:"));
  CHECK_FALSE(parse_listen("localhost:65536"));
  CHECK_FALSE(parse_listen("localhost:-1"));
  CHECK_FALSE(parse_listen("localhost:80x"));
  CHECK_FALSE(parse_listen("[::1]"));
  CHECK_FALSE(parse_listen(""));
}

TEST_CASE("parse_config interpolates values, not comments", "[gateway][config]") {
  ::setenv("TG_UNIT_DB", "/data/from-env.db", 1);
  ::setenv("TG_UNIT_FLUSH", "300ms", 1);
  ::unsetenv("TG_UNIT_MISSING");
  auto c = parse_config("# see ${TG_UNIT_MISSING}\ndatabase: ${TG_UNIT_DB}\n"
                        "metering: {flush_interval: '${TG_UNIT_FLUSH}'}\n"
                        "listen: ${TG_UNIT_MISSING:-127.0.0.1}:${TG_UNIT_MISSING:-7000}\n",
                        "t");
  CHECK(c.database == "/data/from-env.db");
  CHECK(c.metering.flush_interval == 300ms);
  CHECK(c.listen.host == "127.0.0.1");
  CHECK(c.listen.port == 7000);

  auto missing = config_error("database: ${TG_UNIT_MISSING}\n");
  CHECK(contains(missing, "test.yaml"));
  CHECK(contains(missing, "database"));
  CHECK(contains(missing, "TG_UNIT_MISSING"));
  CHECK(contains(config_error("limits: {max_body: '${TG_UNIT_MISSING}'}"), "limits.max_body"));
}

TEST_CASE("the jobs section reads its endpoints, waits and webhook policy, and refuses what it cannot run",
          "[gateway][config][jobs]") {
  const std::string models = R"(
backends: [{name: echo, type: echo}]
models: [{name: echo, deployments: [{backend: echo}]}]
)";
  auto c = parse_config(models + R"(
jobs:
  runsync_wait: 5s
  stream_wait: 250ms
  purge_interval: 2s
  webhook: {secret: abc, timeout: 3s, max_attempts: 2, first_backoff: 20ms, allow_private: true, allow_hosts: [hooks.internal]}
  endpoints:
    - {name: sum-1, model: echo, max_concurrency: 3, max_queue: 10, execution_timeout: 30s, result_ttl: 1h,
       on_interrupt: requeue, defaults: {max_tokens: 64, temperature: 0.5}}
    - {name: plain, model: echo}
)",
                        "test.yaml");
  CHECK(c.jobs.runsync_wait == 5s);
  CHECK(c.jobs.stream_wait == 250ms);
  CHECK(c.jobs.purge_interval == 2s);
  CHECK(c.jobs.webhook.secret == "abc");
  CHECK(c.jobs.webhook.timeout == 3s);
  CHECK(c.jobs.webhook.max_attempts == 2);
  CHECK(c.jobs.webhook.first_backoff == 20ms);
  CHECK(c.jobs.webhook.allow_private);
  CHECK(c.jobs.webhook.allow_hosts == std::vector<std::string>{"hooks.internal"});
  REQUIRE(c.jobs.endpoints.size() == 2);
  const auto& e = c.jobs.endpoints[0];
  CHECK(e.name == "sum-1");
  CHECK(e.model == "echo");
  CHECK(e.max_concurrency == 3);
  CHECK(e.max_queue == 10);
  CHECK(e.execution_timeout == 30s);
  CHECK(e.result_ttl == 1h);
  CHECK(e.requeue_interrupted);
  CHECK(e.defaults.size() == 2);
  const auto& d = c.jobs.endpoints[1];
  CHECK(d.max_concurrency == 4);
  CHECK(d.execution_timeout == 600s);
  CHECK(d.result_ttl == 24h);
  CHECK_FALSE(d.requeue_interrupted);
  CHECK_FALSE(parse_config(models, "test.yaml").jobs.webhook.allow_private);

  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: x, model: nope}]}"), "unknown model 'nope'"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: 'a/b', model: echo}]}"), "jobs.endpoints[0].name"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{model: echo}]}"), "missing key 'name'"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: a, model: echo}, {name: a, model: echo}]}"),
                 "defined twice"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: a, model: echo, on_interrupt: retry}]}"),
                 "fail or requeue"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: a, model: echo, defaults: {logit_bias: 1}}]}"),
                 "logit_bias"));
  CHECK(contains(config_error(models + "jobs: {endpoints: [{name: a, model: echo, max_concurrency: 0}]}"),
                 "max_concurrency"));
  CHECK(contains(config_error(models + "jobs: {webhook: {secrte: x}}"), "secrte"));
  CHECK(contains(config_error(models + "jobs: {purge_interval: 0s}"), "purge_interval"));
}
