#include "backends/backend_factory.hpp"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <catch2/catch.hpp>
#include <filesystem>

#include "backends/config_reader.hpp"
#include "backends/echo.hpp"
#include "backends/local.hpp"
#include "backends/openai_compatible.hpp"
#include "metering/metrics.hpp"

using namespace std::chrono_literals;
using namespace tollgate::backends;

namespace {

// `section` (one `backends` entry, as YAML) read by the type it names, at backends[0] of test.yaml.
std::shared_ptr<const BackendSpec> parse(const std::string& section) {
  auto node = YAML::Load(section);
  const auto* type = builtin_backend_types().find(node["type"].as<std::string>());
  REQUIRE(type);
  return type->parse(ConfigReader("test.yaml"), node, "backends[0]", node["name"].as<std::string>());
}

// The message parse throws for `section`, or "" when it parses.
std::string parse_error(const std::string& section) {
  try {
    parse(section);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("the builtin backend types are found by their type name", "[backends][config]") {
  const auto& types = builtin_backend_types();
  for (const char* name : {"echo", "openai", "local", "runpod"}) {
    REQUIRE(types.find(name));
    CHECK(types.find(name)->name == name);
  }
  CHECK_FALSE(types.find("magic"));
  CHECK_FALSE(types.find(""));
  CHECK(types.names() == "echo, openai, local, runpod");
}

TEST_CASE("each backend type reads its own section into its own config", "[backends][config]") {
  auto echo = parse("{name: e, type: echo, token_delay: 5ms}");
  REQUIRE(echo->as<EchoConfig>());
  CHECK(echo->as<EchoConfig>()->name == "e");
  CHECK(echo->as<EchoConfig>()->token_delay == 5ms);
  CHECK_FALSE(echo->as<OpenAICompatibleConfig>());
  CHECK_FALSE(echo->as<LocalBackendConfig>());

  auto openai = parse(
      "{name: up, type: openai, base_url: 'https://api.example.com/v1', api_key: sk-test, headers: {X-Team: r},\n"
      " timeouts: {connect: 1s, first_byte: 2s, idle: 3s, total: 4m}, max_connections: 8, ca_file: /ca.pem,\n"
      " insecure_skip_verify: yes, tokenizer: /tok.bin}");
  const auto* o = openai->as<OpenAICompatibleConfig>();
  REQUIRE(o);
  CHECK(o->name == "up");
  CHECK(o->base_url == "https://api.example.com/v1");
  CHECK(o->api_key == "sk-test");
  REQUIRE(o->headers.size() == 1);
  CHECK(o->headers[0] == std::pair<std::string, std::string>("X-Team", "r"));
  CHECK(o->connect_timeout == 1s);
  CHECK(o->first_byte_timeout == 2s);
  CHECK(o->idle_timeout == 3s);
  CHECK(o->total_timeout == 4min);
  CHECK(o->max_connections == 8);
  CHECK(o->ca_file == "/ca.pem");
  CHECK(o->insecure_skip_verify);
  CHECK(o->tokenizer_path == "/tok.bin");
  CHECK_FALSE(openai->as<EchoConfig>());

  // What a section leaves out keeps the config's defaults.
  auto bare_spec = parse("{name: v, type: openai, base_url: 'http://vllm:8000/v1'}");
  const auto* bare = bare_spec->as<OpenAICompatibleConfig>();
  REQUIRE(bare);
  CHECK(bare->api_key.empty());
  CHECK(bare->total_timeout == OpenAICompatibleConfig{}.total_timeout);
  CHECK(bare->max_connections == OpenAICompatibleConfig{}.max_connections);

  auto local = parse(
      "{name: l, type: local, path: /m.gguf, create_demo: true, max_num_seqs: 3, kv_cache: 1MiB,\n"
      " prefix_caching: off}");
  const auto* l = local->as<LocalBackendConfig>();
  REQUIRE(l);
  CHECK(l->name == "l");
  CHECK(l->model_path == "/m.gguf");
  CHECK(l->create_demo);
  CHECK(l->device == "auto");
  CHECK(l->engine.max_num_seqs == 3);
  CHECK(l->engine.kv_cache_bytes == 1024 * 1024);
  CHECK_FALSE(l->engine.prefix_caching);
  CHECK(l->engine.block_size == 16);
  CHECK(l->metrics == nullptr);  // the context's registry, given when it is built
}

TEST_CASE("a key another type knows is unknown to this one, by path", "[backends][config]") {
  auto echo = parse_error("{name: e, type: echo, base_url: 'http://x/v1'}");
  CHECK(contains(echo, "test.yaml: backends[0]: unknown key 'base_url' (known keys: name, token_delay, type)"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', device: cpu}"),
                 "test.yaml: backends[0]: unknown key 'device'"));
  CHECK(contains(parse_error("{name: l, type: local, path: /m.gguf, token_delay: 1s}"),
                 "test.yaml: backends[0]: unknown key 'token_delay'"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', timeouts: {firstbyte: 1s}}"),
                 "test.yaml: backends[0].timeouts: unknown key 'firstbyte' (known keys: connect, first_byte, idle, "
                 "total)"));
}

TEST_CASE("a value of the wrong kind is an error naming its path", "[backends][config]") {
  CHECK(contains(parse_error("{name: e, type: echo, token_delay: [1ms]}"),
                 "test.yaml: backends[0].token_delay: expected a single value"));
  CHECK(contains(parse_error("{name: e, type: echo, token_delay: slow}"),
                 "backends[0].token_delay: expected a duration such as 500ms, 10s or 2m, got 'slow'"));
  CHECK(contains(parse_error("{name: o, type: openai}"), "backends[0]: missing key 'base_url'"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'ftp://x'}"),
                 "backends[0].base_url: must start with http:// or https://"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', headers: [X-A]}"),
                 "backends[0].headers: expected a mapping of header names to values"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', max_connections: many}"),
                 "backends[0].max_connections: expected an integer, got 'many'"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', insecure_skip_verify: maybe}"),
                 "backends[0].insecure_skip_verify: expected true or false, got 'maybe'"));
  CHECK(contains(parse_error("{name: o, type: openai, base_url: 'http://x/v1', timeouts: {idle: 0s}}"),
                 "backends[0].timeouts.idle: must be positive"));
  CHECK(contains(parse_error("{name: l, type: local}"), "backends[0]: missing key 'path' (the model file)"));
  CHECK(contains(parse_error("{name: l, type: local, path: /m.gguf, max_num_seqs: {a: 1}}"),
                 "backends[0].max_num_seqs: expected a single value"));
  CHECK(contains(parse_error("{name: l, type: local, path: /m.gguf, kv_cache: lots}"),
                 "backends[0].kv_cache: expected a size"));
  CHECK(contains(parse_error("{name: l, type: local, path: /m.gguf, threads: -1}"),
                 "backends[0].threads: must be between 0 and 1024"));
}

TEST_CASE("a spec builds its backend, and a build failure names the backend", "[backends][config]") {
  tollgate::metering::Registry registry;
  BackendContext context{registry};

  auto echo = parse("{name: e, type: echo}")->make(context);
  REQUIRE(echo);
  CHECK(echo->name() == "e");
  CHECK(echo->type() == "echo");

  auto missing_ca = parse("{name: o, type: openai, base_url: 'https://x/v1', ca_file: /nonexistent/ca.pem}");
  CHECK_THROWS_WITH(missing_ca->make(context), Catch::Contains("backend 'o': cannot load the TLS trust store"));
  auto missing_model = parse("{name: l, type: local, path: /nonexistent/model.gguf}");
  CHECK_THROWS_AS(missing_model->make(context), ConfigError);
  CHECK_THROWS_WITH(missing_model->make(context), Catch::StartsWith("backend 'l': "));
}

TEST_CASE("a local spec with create_demo writes the demo model it then serves", "[backends][config]") {
  auto dir = std::filesystem::temp_directory_path() / ("tollgate-demo-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  auto path = (dir / "demo.gguf").string();
  tollgate::metering::Registry registry;
  auto backend = parse("{name: d, type: local, path: '" + path + "', create_demo: true, max_num_seqs: 1}")
                     ->make(BackendContext{registry});
  REQUIRE(backend);
  CHECK(backend->type() == "local");
  CHECK(std::filesystem::exists(path));
  CHECK(contains(registry.render(), "tollgate_engine_num_requests_running{backend=\"d\"}"));
  backend.reset();
  std::filesystem::remove_all(dir);
}
