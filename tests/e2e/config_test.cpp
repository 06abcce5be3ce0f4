// `tollgate config ...` and configuration errors, through the real binary.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "harness.hpp"

using namespace tollgate::test;

namespace {

std::string write_file(const TempDir& dir, const std::string& name, const std::string& text) {
  auto path = dir.file(name);
  std::ofstream(path) << text;
  return path;
}

}  // namespace

TEST_CASE("config check rejects unknown keys and names them", "[e2e][config]") {
  TempDir dir;
  auto top = write_file(dir, "top.yaml", "listen: 127.0.0.1:8080\nlisten_port: 9000\n");
  auto r = run_tollgate({"config", "check", top});
  CHECK(r.exit_code != 0);
  CHECK(r.err.find("listen_port") != std::string::npos);
  CHECK(r.err.find("top.yaml") != std::string::npos);
  CHECK(r.out.find(": ok") == std::string::npos);

  auto nested = write_file(dir, "nested.yaml", "limits:\n  max_body: 1MiB\n  max_bodyy: 2MiB\n");
  auto n = run_tollgate({"config", "check", nested});
  CHECK(n.exit_code != 0);
  CHECK(n.err.find("max_bodyy") != std::string::npos);
  CHECK(n.err.find("limits") != std::string::npos);

  auto deep = write_file(dir, "deep.yaml",
                         "backends: [{name: echo, type: echo}]\n"
                         "models:\n  - name: echo\n    deployments: [{backend: echo, wieght: 2}]\n");
  auto d = run_tollgate({"config", "check", deep});
  CHECK(d.exit_code != 0);
  CHECK(d.err.find("wieght") != std::string::npos);
  CHECK(d.err.find("models[0].deployments[0]") != std::string::npos);

  auto good = write_file(dir, "good.yaml", "limits:\n  max_body: 1MiB\n");
  auto g = run_tollgate({"config", "check", good});
  CHECK(g.exit_code == 0);
  CHECK(g.out.find("ok") != std::string::npos);

  auto missing = run_tollgate({"config", "check", dir.file("absent.yaml")});
  CHECK(missing.exit_code != 0);
  CHECK(missing.err.find("absent.yaml") != std::string::npos);
}

TEST_CASE("${ENV} interpolation in the configuration", "[e2e][config]") {
  TempDir dir;
  auto config = write_file(dir, "env.yaml", "# a comment may mention ${NOT_SET_ANYWHERE_TG}\ndatabase: ${TG_TEST_DB}\n");

  auto db = dir.file("from-env.db");
  auto set = run_tollgate({"config", "check", config}, 30s, {{"TG_TEST_DB", db}});
  CHECK(set.exit_code == 0);
  // The value really is used: the CLI opens the database the variable names.
  auto created = run_tollgate({"keys", "create", "--user", "envy", "--config", config}, 30s, {{"TG_TEST_DB", db}});
  INFO(created.err);
  CHECK(created.exit_code == 0);
  CHECK(std::filesystem::exists(db));

  // An empty value counts as unset (and makes the test independent of the caller's environment).
  auto unset = run_tollgate({"config", "check", config}, 30s, {{"TG_TEST_DB", ""}});
  CHECK(unset.exit_code != 0);
  CHECK(unset.err.find("TG_TEST_DB") != std::string::npos);
  CHECK(unset.err.find("database") != std::string::npos);

  auto with_default = write_file(dir, "default.yaml",
                                 "database: ${TG_TEST_UNSET_VARIABLE_0451:-" + dir.file("fallback.db") + "}\n");
  auto fallback = run_tollgate({"keys", "create", "--user", "fallback", "--config", with_default});
  INFO(fallback.err);
  CHECK(fallback.exit_code == 0);
  CHECK(std::filesystem::exists(dir.file("fallback.db")));

  auto overridden = run_tollgate({"keys", "create", "--user", "fallback", "--config", with_default}, 30s,
                                 {{"TG_TEST_UNSET_VARIABLE_0451", dir.file("override.db")}});
  CHECK(overridden.exit_code == 0);
  CHECK(std::filesystem::exists(dir.file("override.db")));

  auto nested = write_file(dir, "nested.yaml", "metering:\n  flush_interval: ${TG_TEST_FLUSH}\n");
  CHECK(run_tollgate({"config", "check", nested}, 30s, {{"TG_TEST_FLUSH", "250ms"}}).exit_code == 0);
  auto bad_value = run_tollgate({"config", "check", nested}, 30s, {{"TG_TEST_FLUSH", "soon"}});
  CHECK(bad_value.exit_code != 0);
  CHECK(bad_value.err.find("metering.flush_interval") != std::string::npos);
}

TEST_CASE("serve with an invalid configuration exits 1 and says why", "[e2e][config]") {
  TempDir dir;
  auto config = write_file(dir, "bad.yaml",
                           "backends: [{name: echo, type: echo}]\n"
                           "models: [{name: m, deployments: [{backend: nowhere}]}]\n");
  auto r = run_tollgate({"serve", "--config", config, "--listen", "127.0.0.1:0", "--db", dir.file("t.db")}, 20s);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("nowhere") != std::string::npos);
  CHECK(r.out.find("listening") == std::string::npos);

  auto unknown = write_file(dir, "unknown.yaml", "limits: {max_bodyy: 1MiB}\n");
  auto u = run_tollgate({"serve", "--config", unknown, "--listen", "127.0.0.1:0", "--db", dir.file("t.db")}, 20s);
  CHECK(u.exit_code == 1);
  CHECK(u.err.find("max_bodyy") != std::string::npos);

  auto yaml = write_file(dir, "broken.yaml", "limits: {max_body: [\n");
  auto b = run_tollgate({"serve", "--config", yaml, "--listen", "127.0.0.1:0", "--db", dir.file("t.db")}, 20s);
  CHECK(b.exit_code == 1);
  CHECK(!b.err.empty());
}

TEST_CASE("config default prints YAML that config check accepts and serve runs", "[e2e][config]") {
  TempDir dir;
  auto r = run_tollgate({"config", "default"});
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("backends:") != std::string::npos);
  CHECK(r.out.find("models:") != std::string::npos);
  auto path = write_file(dir, "default.yaml", r.out);
  auto check = run_tollgate({"config", "check", path});
  CHECK(check.exit_code == 0);

  GatewayProcess gw(dir, {.config_yaml = r.out, .db = "", .env = {}});
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port());
  CHECK(client.post("/v1/chat/completions", key, chat_body("echo", "default works")).status == 200);
}

TEST_CASE("the README's sample configuration passes config check", "[e2e][config]") {
  std::ifstream in(std::string(TOLLGATE_SOURCE_DIR) + "/README.md");
  REQUIRE(in);
  std::string readme((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto section = readme.find("\n## Configuration\n");
  REQUIRE(section != std::string::npos);
  auto open = readme.find("```yaml\n", section);
  REQUIRE(open != std::string::npos);
  REQUIRE(open < readme.find("\n## ", section + 1));  // the block is in this section
  open += 8;
  auto close = readme.find("\n```", open);
  REQUIRE(close != std::string::npos);
  const std::string yaml = readme.substr(open, close - open + 1);
  CHECK(yaml.find("backends:") != std::string::npos);
  CHECK(yaml.find("models:") != std::string::npos);

  TempDir dir;
  auto path = write_file(dir, "readme.yaml", yaml);
  // The check reads the file's ${...} references but not the model files.
  auto check = run_tollgate({"config", "check", path}, 30s,
                            {{"GROQ_API_KEY", "gsk-test-not-a-key"}, {"RUNPOD_API_KEY", "rp-test-not-a-key"}});
  INFO(check.err);
  CHECK(check.exit_code == 0);
  CHECK(check.out.find(": ok") != std::string::npos);
  // And the sample means what it says: without the secret it names the variable.
  auto unset = run_tollgate({"config", "check", path}, 30s, {{"GROQ_API_KEY", ""}});
  CHECK(unset.exit_code == 1);
  CHECK(unset.err.find("GROQ_API_KEY") != std::string::npos);
}
