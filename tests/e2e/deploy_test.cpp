// The deployment files under compose/, checked as far as a machine without a
// container engine allows: docker-compose's own validation, the real
// Prometheus scraping the real Tollgate with the shipped scrape config, every
// dashboard query through that Prometheus, the Kubernetes manifests against
// the config they carry, the Dockerfiles against what the binary links.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "deploy_support.hpp"
#include "harness.hpp"
#include "tests/local_engine/reference.hpp"

using namespace tollgate::test;
using namespace tollgate::test::deploy;
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string str(const json::value& v) { return std::string(v.as_string()); }

// "0.0.0.0:8080" -> "8080".
std::string port_of(const std::string& listen) { return listen.substr(listen.rfind(':') + 1); }

std::string parent_dir(const std::string& path) { return path.substr(0, path.rfind('/')); }

// The real Prometheus (Debian package) with `config_text`, storage in `dir`,
// its API on a loopback port.
class PrometheusProcess {
 public:
  PrometheusProcess(const TempDir& dir, const std::string& config_text) {
    auto config = dir.file("prometheus.yml");
    write_text(config, config_text);
    auto check = run_command("promtool check config " + shell_quote(config), 30);
    INFO(check.output);
    REQUIRE(check.exit_code == 0);
    for (int attempt = 0; attempt < 3; ++attempt) {
      port_ = free_port();
      process_ = std::make_unique<ChildProcess>(
          "/usr/bin/prometheus --config.file=" + shell_quote(config) + " --storage.tsdb.path=" +
              shell_quote(dir.file("prometheus-data-" + std::to_string(attempt))) +
              " --web.listen-address=127.0.0.1:" + std::to_string(port_) + " --log.level=warn",
          dir.file("prometheus-" + std::to_string(attempt) + ".log"));
      auto deadline = Clock::now() + 60s;
      while (Clock::now() < deadline && process_->running()) {
        if (try_get(port_, "/-/ready").status == 200) return;
        std::this_thread::sleep_for(100ms);
      }
      last_log_ = process_->log();
      process_.reset();
    }
    FAIL("prometheus did not come up: " << last_log_);
  }

  // GET /api/v1/query: the HTTP status and the JSON body.
  std::pair<int, json::value> query(const std::string& promql) {
    auto r = try_get(port_, "/api/v1/query?query=" + url_encode(promql));
    json::value body;
    try {
      body = json::parse(r.body);
    } catch (const std::exception&) {
    }
    return {r.status, body};
  }

 private:
  std::uint16_t port_ = 0;
  std::unique_ptr<ChildProcess> process_;
  std::string last_log_;
};

// Tollgate with per-user metrics on and some traffic of every kind the
// dashboard charts: completions (tokens, time to first token) from echo and
// from the local engine, a 401, a 429.
struct BusyGateway {
  explicit BusyGateway(const TempDir& dir) : gw(dir, options()) {
    auto key = create_key(gw.db(), "alice", {"--rpm", "3"});
    wait_for_key(gw.port(), key);
    HttpClient client(gw.port());
    client.post("/v1/chat/completions", key, chat_body("echo", "one two three", R"("stream":true)"));
    client.post("/v1/completions", key, R"({"model":"echo","prompt":"four five"})");
    client.post("/v1/chat/completions", "tg-notakey", chat_body("echo", "x"));
    client.post("/v1/completions", key, R"({"model":"stories","prompt":"Once","max_tokens":5})");
    for (int i = 0; i < 3; ++i) client.post("/v1/chat/completions", key, chat_body("echo", "over"));
  }
  static GatewayProcess::Options options() {
    GatewayProcess::Options o;
    o.config_yaml = R"(
metering: {per_user_metrics: true, flush_interval: 100ms}
backends:
  - {name: echo, type: echo}
  - {name: local, type: local, path: )" + shared_model("stories260K.bin") + ", tokenizer: " + shared_model("tok512.bin") + R"(}
models:
  - name: echo
    deployments: [{backend: echo}]
  - name: stories
    deployments: [{backend: local}]
)";
    return o;
  }
  std::string metrics() { return HttpClient(gw.port()).get("/metrics").body; }
  GatewayProcess gw;
};

// The shipped scrape config aimed at `port` and scraping every second.
std::string scrape_config_for(std::uint16_t port) {
  auto text = read_text(source_path("compose/prometheus/prometheus.yml"));
  REQUIRE(replace_all(text, "\"tollgate:8080\"", "\"127.0.0.1:" + std::to_string(port) + "\"") == 1);
  REQUIRE(replace_all(text, "scrape_interval: 5s", "scrape_interval: 1s") == 1);
  return text;
}

// The metric names a PromQL expression reads: identifiers that are not
// functions, aggregations, keywords, label names (inside {} or by/without/
// on/ignoring/group_* lists), strings, numbers or durations.
std::set<std::string> promql_metric_names(const std::string& expr) {
  static const std::set<std::string> keywords = {
      "sum",     "min",    "max",        "avg",         "count", "stddev",   "stdvar", "topk", "bottomk",
      "quantile", "count_values", "group", "by",        "without", "on",     "ignoring", "group_left",
      "group_right", "bool", "and",      "or",          "unless", "offset",  "inf",    "nan",  "atan2"};
  static const std::set<std::string> label_lists = {"by", "without", "on", "ignoring", "group_left", "group_right"};
  std::set<std::string> names;
  bool skip_next_parens = false;
  std::size_t i = 0;
  auto is_start = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  auto is_part = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  auto skip_to = [&](char close) {
    int depth = 0;
    char open = close == ')' ? '(' : close == '}' ? '{' : '[';
    for (; i < expr.size(); ++i) {
      if (expr[i] == '"' || expr[i] == '\'') {
        char q = expr[i++];
        while (i < expr.size() && expr[i] != q) i += expr[i] == '\\' ? 2 : 1;
        continue;
      }
      if (expr[i] == open) ++depth;
      if (expr[i] == close && --depth == 0) {
        ++i;
        return;
      }
    }
  };
  while (i < expr.size()) {
    char c = expr[i];
    if (c == '"' || c == '\'' || c == '`') {
      ++i;
      while (i < expr.size() && expr[i] != c) i += expr[i] == '\\' ? 2 : 1;
      ++i;
    } else if (c == '{') {
      skip_to('}');
    } else if (c == '[') {
      skip_to(']');
    } else if (c == '(' && skip_next_parens) {
      skip_next_parens = false;
      skip_to(')');
    } else if (std::isdigit(static_cast<unsigned char>(c)) || (c == '.' && i + 1 < expr.size() &&
                                                              std::isdigit(static_cast<unsigned char>(expr[i + 1])))) {
      while (i < expr.size() && (is_part(expr[i]) || expr[i] == '.')) ++i;
    } else if (is_start(c)) {
      auto start = i;
      while (i < expr.size() && is_part(expr[i])) ++i;
      auto word = expr.substr(start, i - start);
      auto next = expr.find_first_not_of(" \t\n", i);
      bool call = next != std::string::npos && expr[next] == '(';
      if (label_lists.contains(word)) {
        skip_next_parens = true;
      } else if (!keywords.contains(word) && !call) {
        names.insert(word);
      }
    } else {
      ++i;
    }
  }
  return names;
}

// Grafana's built-in interval variables, as Grafana would send them.
std::string expand_grafana_variables(std::string expr) {
  replace_all(expr, "$__rate_interval", "1m");
  replace_all(expr, "$__interval", "15s");
  replace_all(expr, "$__range", "1h");
  return expr;
}

// Every panel, rows' nested panels included.
void collect_panels(const json::array& panels, std::vector<json::object>& out) {
  for (const auto& p : panels) {
    out.push_back(p.as_object());
    if (auto nested = p.as_object().if_contains("panels")) collect_panels(nested->as_array(), out);
  }
}

json::object find_kind(const json::array& docs, const std::string& kind, const std::string& name = "") {
  for (const auto& d : docs) {
    if (d.is_object() && d.at("kind") == kind.c_str() &&
        (name.empty() || d.at("metadata").at("name") == name.c_str())) {
      return d.as_object();
    }
  }
  FAIL("no " << kind << " " << name << " in the manifests");
  return {};
}

}  // namespace

TEST_CASE("PromQL metric-name extraction finds metrics and only metrics", "[e2e][grafana]") {
  // The dashboard check below relies on this: a self-test of the scanner.
  CHECK(promql_metric_names(R"(histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{route=~"/v1/.*"}[5m]))))") ==
        std::set<std::string>{"a_bucket"});
  CHECK(promql_metric_names("topk(10, sum by (user) (increase(b_total[1h]))) / on(user) group_left c") ==
        std::set<std::string>{"b_total", "c"});
  CHECK(promql_metric_names(R"(d{job="x"} / e offset 5m > bool 0.5)") == std::set<std::string>{"d", "e"});
}

TEST_CASE("docker-compose validates the compose file and it agrees with tollgate.yaml", "[e2e][compose]") {
  REQUIRE(run_command("command -v docker-compose").exit_code == 0);  // Debian package docker-compose
  TempDir dir;
  auto compose_file = source_path("compose/docker-compose.yml");
  // The environment this test runs in must not stand in for the .env file.
  std::string clean_env = "env -u TOLLGATE_ADMIN_KEY -u GRAFANA_ADMIN_PASSWORD -u GROQ_API_KEY -u OPENAI_API_KEY ";

  // Without the .env the required secrets are named, not silently empty.
  write_text(dir.file("empty.env"), "");
  auto bare = run_command(clean_env + "docker-compose --env-file " + shell_quote(dir.file("empty.env")) + " -f " +
                              shell_quote(compose_file) + " config",
                          60);
  CHECK(bare.exit_code != 0);
  CHECK(bare.output.find("TOLLGATE_ADMIN_KEY") != std::string::npos);

  // With .env.example as the .env, it validates.
  auto rendered = dir.file("compose.rendered.yml");
  auto r = run_command(clean_env + "docker-compose --env-file " + shell_quote(source_path("compose/.env.example")) +
                           " -f " + shell_quote(compose_file) + " config > " + shell_quote(rendered),
                       60);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);

  auto compose = yaml_document(rendered).as_object();
  auto& services = compose.at("services").as_object();
  for (const char* s : {"tollgate", "nginx", "prometheus", "grafana", "app"}) {
    INFO(s);
    CHECK(services.contains(s));
  }
  auto tollgate_yaml = yaml_document(source_path("compose/tollgate.yaml")).as_object();
  auto listen_port = port_of(str(tollgate_yaml.at("listen")));
  auto database = str(tollgate_yaml.at("database"));

  // Mounts as docker-compose resolved them: target -> source.
  auto mounts = [&](const char* service) {
    std::map<std::string, std::string> m;
    for (const auto& v : services.at(service).at("volumes").as_array()) {
      if (v.is_object()) {
        m[str(v.at("target"))] = str(v.at("source"));
        continue;
      }
      // docker-compose 1.x prints the short form SOURCE:TARGET[:MODE].
      auto text = str(v);
      auto first = text.find(':'), second = text.find(':', first + 1);
      m[text.substr(first + 1, second == std::string::npos ? std::string::npos : second - first - 1)] =
          text.substr(0, first);
    }
    return m;
  };
  auto tg = services.at("tollgate").as_object();
  auto tg_mounts = mounts("tollgate");
  // The command's --config is the mounted tollgate.yaml; the database's folder is the data volume.
  auto& command = tg.at("command").as_array();
  auto config_arg = std::find(command.begin(), command.end(), json::value("--config"));
  REQUIRE(config_arg != command.end());
  auto config_path = str(*(config_arg + 1));
  REQUIRE(tg_mounts.count(config_path) == 1);
  CHECK(std::filesystem::equivalent(tg_mounts[config_path], source_path("compose/tollgate.yaml")));
  REQUIRE(tg_mounts.count(parent_dir(database)) == 1);
  CHECK(tg_mounts[parent_dir(database)] == "tollgate-data");
  CHECK(compose.at("volumes").as_object().contains("tollgate-data"));
  // docker stop waits longer than Tollgate's drain.
  auto grace = duration_seconds(str(tollgate_yaml.at("limits").at("shutdown_grace")));
  CHECK(duration_seconds(str(tg.at("stop_grace_period"))) > grace);
  // Provider keys and the admin key reach the container.
  for (const char* var : {"TOLLGATE_ADMIN_KEY", "GROQ_API_KEY", "OPENAI_API_KEY"}) {
    INFO(var);
    CHECK(tg.at("environment").as_object().contains(var));
  }

  // nginx: the shipped template, aimed at Tollgate's port, from the address Tollgate trusts.
  auto nginx = services.at("nginx").as_object();
  auto nginx_mounts = mounts("nginx");
  REQUIRE(nginx_mounts.count("/etc/nginx/templates/default.conf.template") == 1);
  CHECK(std::filesystem::equivalent(nginx_mounts["/etc/nginx/templates/default.conf.template"],
                                    source_path("nginx/tollgate.conf")));
  CHECK(str(nginx.at("environment").at("TOLLGATE_UPSTREAM")) == "tollgate:" + listen_port);
  auto nginx_ip = str(nginx.at("networks").at("edge").at("ipv4_address"));
  auto& trusted = tollgate_yaml.at("trusted_proxies").as_array();
  CHECK(std::find(trusted.begin(), trusted.end(), json::value(nginx_ip)) != trusted.end());
  for (const char* var : {"NGINX_HTTPS_LISTEN", "NGINX_HTTP_LISTEN", "TLS_CERT", "TLS_KEY", "NGINX_CONN_LIMIT"}) {
    INFO(var);
    CHECK(nginx.at("environment").as_object().contains(var));
  }

  // The app: tollgate.yaml's app_upstream names the service and a port it exposes.
  auto app_url = str(tollgate_yaml.at("app_upstream"));
  std::smatch m;
  REQUIRE(std::regex_match(app_url, m, std::regex(R"(http://([^:/]+):(\d+)/?)")));
  REQUIRE(services.contains(m[1].str()));
  auto& exposed = services.at(m[1].str()).at("expose").as_array();
  CHECK(std::find(exposed.begin(), exposed.end(), json::value(m[2].str())) != exposed.end());

  // Prometheus scrapes tollgate:<listen port>; Grafana gets the provisioning and dashboards.
  auto prom = yaml_document(source_path("compose/prometheus/prometheus.yml"));
  auto& target = prom.at("scrape_configs").at(0).at("static_configs").at(0).at("targets").at(0);
  CHECK(str(target) == "tollgate:" + listen_port);
  CHECK(std::filesystem::equivalent(mounts("prometheus")["/etc/prometheus/prometheus.yml"],
                                    source_path("compose/prometheus/prometheus.yml")));
  auto grafana_mounts = mounts("grafana");
  CHECK(std::filesystem::equivalent(grafana_mounts["/etc/grafana/provisioning"],
                                    source_path("compose/grafana/provisioning")));
  auto provider = yaml_document(source_path("compose/grafana/provisioning/dashboards/tollgate.yml"));
  auto dashboards_path = str(provider.at("providers").at(0).at("options").at("path"));
  REQUIRE(grafana_mounts.count(dashboards_path) == 1);
  CHECK(std::filesystem::equivalent(grafana_mounts[dashboards_path], source_path("compose/grafana/dashboards")));

  // The secrets file stays out of git.
  auto ignored = run_command("git -C " + shell_quote(source_path("")) + " check-ignore -q compose/.env");
  CHECK(ignored.exit_code == 0);
}

TEST_CASE("the shipped compose tollgate.yaml passes tollgate config check", "[e2e][compose]") {
  // Every key in the file (openai backends, app_upstream, public_paths,
  // trusted_proxies) is one this build knows: the file is checked whole.
  EnvVars env = {{"GROQ_API_KEY", "gsk-test"}, {"OPENAI_API_KEY", "sk-test"}};
  auto r = run_tollgate({"config", "check", source_path("compose/tollgate.yaml")}, 30s, env);
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  // The provider keys come from the environment: without them the check names them.
  auto missing = run_tollgate({"config", "check", source_path("compose/tollgate.yaml")}, 30s,
                              {{"GROQ_API_KEY", ""}, {"OPENAI_API_KEY", "sk-test"}});
  CHECK(missing.exit_code != 0);
  CHECK((missing.out + missing.err).find("GROQ_API_KEY") != std::string::npos);
}

TEST_CASE("the real Prometheus scrapes Tollgate with the shipped scrape config", "[e2e][prometheus]") {
  TempDir dir;
  BusyGateway busy(dir);
  PrometheusProcess prometheus(dir, scrape_config_for(busy.gw.port()));

  // Scraped every second: Tollgate's series show up within a bounded wait.
  json::array result;
  auto deadline = Clock::now() + 60s;
  while (Clock::now() < deadline) {
    auto [status, body] = prometheus.query("tollgate_http_requests_total");
    if (status == 200 && body.is_object() && body.at("status") == "success") {
      result = body.at("data").at("result").as_array();
      if (!result.empty()) break;
    }
    std::this_thread::sleep_for(200ms);
  }
  REQUIRE_FALSE(result.empty());
  bool saw_completions = false;
  for (const auto& series : result) {
    auto& metric = series.at("metric").as_object();
    CHECK(metric.at("job") == "tollgate");
    CHECK(metric.at("service") == "tollgate");  // the shipped static label
    CHECK(metric.at("instance") == ("127.0.0.1:" + std::to_string(busy.gw.port())).c_str());
    if (metric.at("route") == "/v1/chat/completions" && metric.at("status") == "200") saw_completions = true;
  }
  CHECK(saw_completions);
  auto [status, up] = prometheus.query("up{job=\"tollgate\"}");
  REQUIRE(status == 200);
  CHECK(up.at("data").at("result").at(0).at("value").at(1) == "1");
}

TEST_CASE("every dashboard query parses in Prometheus and names only metrics Tollgate exports", "[e2e][grafana]") {
  TempDir dir;
  BusyGateway busy(dir);
  auto exported = exposition_names(busy.metrics());
  REQUIRE(exported.contains("tollgate_http_requests_total"));
  REQUIRE(exported.contains("tollgate_user_tokens_total"));  // per-user metrics are on

  json::value dashboard;
  REQUIRE_NOTHROW(dashboard = json::parse(read_text(source_path("compose/grafana/dashboards/tollgate.json"))));
  auto datasources = yaml_document(source_path("compose/grafana/provisioning/datasources/prometheus.yml"));
  auto& ds = datasources.at("datasources").at(0);
  CHECK(ds.at("type") == "prometheus");
  auto uid = str(ds.at("uid"));

  std::vector<json::object> panels;
  collect_panels(dashboard.at("panels").as_array(), panels);
  std::vector<std::string> exprs;
  std::set<std::string> titles;
  for (const auto& p : panels) {
    titles.insert(str(p.at("title")));
    auto targets = p.if_contains("targets");
    if (!targets) continue;
    INFO(str(p.at("title")));
    CHECK(p.at("datasource").at("uid") == uid.c_str());
    CHECK(p.at("datasource").at("type") == "prometheus");
    for (const auto& t : targets->as_array()) {
      CHECK(t.at("datasource").at("uid") == uid.c_str());
      exprs.push_back(str(t.at("expr")));
    }
  }
  REQUIRE(exprs.size() >= 10);
  REQUIRE(exported.contains("tollgate_engine_kv_cache_usage_perc"));  // the local engine ran
  // What the issue asks the dashboard to show.
  for (const char* t : {"Requests/s by status", "Gateway overhead p50 / p99", "Tokens/s by model and backend",
                        "Top users by requests", "Top users by tokens", "Engine queue: running and waiting requests",
                        "KV cache usage", "Time to first token p50 / p99 by model and backend",
                        "Upstream errors by backend", "Quota rejections and auth failures"}) {
    INFO(t);
    CHECK(titles.contains(t));
  }

  PrometheusProcess prometheus(dir, scrape_config_for(busy.gw.port()));
  // A parse error is a 400: proof the endpoint judges what it is sent.
  CHECK(prometheus.query("sum by (route (rate(tollgate_http_requests_total[1m]))").first == 400);
  for (const auto& raw : exprs) {
    auto expr = expand_grafana_variables(raw);
    INFO(raw);
    CHECK(expr.find('$') == std::string::npos);  // no dashboard variable left unexpanded
    auto [status, body] = prometheus.query(expr);
    INFO(json::serialize(body));
    CHECK(status == 200);
    auto names = promql_metric_names(expr);
    CHECK_FALSE(names.empty());
    for (const auto& name : names) {
      INFO(name);
      CHECK(exported.contains(name));
    }
  }
}

TEST_CASE("the Kubernetes manifests parse and agree with the tollgate.yaml they carry", "[e2e][k8s]") {
  TempDir dir;
  json::array docs;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(source_path("compose/k8s"))) {
    if (entry.path().extension() != ".yaml" || entry.path().filename() == "kustomization.yaml") continue;
    if (entry.path().filename() == "gpu-patch.yaml") continue;  // checked below, against the StatefulSet
    if (entry.path().parent_path().filename() == "replicas") continue;  // the other option, checked on its own
    for (auto& d : yaml_documents(entry.path().string())) docs.push_back(d);
  }
  auto configmap = find_kind(docs, "ConfigMap");
  auto secret = find_kind(docs, "Secret");
  auto sts = find_kind(docs, "StatefulSet");

  // The carried tollgate.yaml is valid for this build, with the Secret's values as the environment.
  auto config_text = str(configmap.at("data").at("tollgate.yaml"));
  write_text(dir.file("tollgate.yaml"), config_text);
  EnvVars env;
  for (const auto& [k, v] : secret.at("stringData").as_object()) env.emplace_back(std::string(k), str(v));
  auto check = run_tollgate({"config", "check", dir.file("tollgate.yaml")}, 30s, env);
  INFO(check.out << check.err);
  REQUIRE(check.exit_code == 0);
  auto config = yaml_document(dir.file("tollgate.yaml")).as_object();
  auto listen_port = std::stoi(port_of(str(config.at("listen"))));
  auto database = str(config.at("database"));
  auto grace = duration_seconds(str(config.at("limits").at("shutdown_grace")));

  auto& spec = sts.at("spec").as_object();
  CHECK(spec.at("replicas") == 1);  // SQLite: one writer (docs/deployment.md)
  auto& pod = spec.at("template").at("spec").as_object();
  auto& container = pod.at("containers").at(0).as_object();

  // Ports: the named container port is the listen port; the probes and the Service use it.
  std::map<std::string, std::int64_t> ports;
  for (const auto& p : container.at("ports").as_array()) ports[str(p.at("name"))] = p.at("containerPort").as_int64();
  REQUIRE(ports.count("http") == 1);
  CHECK(ports["http"] == listen_port);
  auto probe_port = [&](const json::value& probe) -> std::int64_t {
    auto& port = probe.at("httpGet").at("port");
    return port.is_string() ? ports.at(str(port)) : port.as_int64();
  };
  CHECK(container.at("readinessProbe").at("httpGet").at("path") == "/readyz");
  CHECK(probe_port(container.at("readinessProbe")) == listen_port);
  CHECK(container.at("livenessProbe").at("httpGet").at("path") == "/healthz");
  CHECK(probe_port(container.at("livenessProbe")) == listen_port);
  for (const auto& d : docs) {
    if (d.at("kind") != "Service") continue;
    auto& target = d.at("spec").at("ports").at(0).at("targetPort");
    CHECK((target.is_string() ? ports.at(str(target)) : target.as_int64()) == listen_port);
    CHECK(d.at("spec").at("selector") == spec.at("template").at("metadata").at("labels"));
  }

  // Volumes: every mount names a volume or claim; the database lives on the claim;
  // --config is the ConfigMap's file.
  std::set<std::string> volumes;
  std::string config_volume;
  for (const auto& v : pod.at("volumes").as_array()) {
    volumes.insert(str(v.at("name")));
    if (auto cm = v.as_object().if_contains("configMap")) {
      CHECK(cm->at("name") == configmap.at("metadata").at("name"));
      config_volume = str(v.at("name"));
    }
  }
  std::set<std::string> claims;
  for (const auto& c : spec.at("volumeClaimTemplates").as_array()) claims.insert(str(c.at("metadata").at("name")));
  std::map<std::string, std::string> mount_by_path;
  for (const auto& m : container.at("volumeMounts").as_array()) {
    auto name = str(m.at("name"));
    INFO(name);
    CHECK((volumes.contains(name) || claims.contains(name)));
    mount_by_path[str(m.at("mountPath"))] = name;
  }
  REQUIRE(mount_by_path.count(parent_dir(database)) == 1);
  CHECK(claims.contains(mount_by_path[parent_dir(database)]));
  auto& args = container.at("args").as_array();
  auto config_arg = std::find(args.begin(), args.end(), json::value("--config"));
  REQUIRE(config_arg != args.end());
  auto config_path = str(*(config_arg + 1));
  REQUIRE(mount_by_path.count(parent_dir(config_path)) == 1);
  CHECK(mount_by_path[parent_dir(config_path)] == config_volume);
  CHECK(config_path.substr(config_path.rfind('/') + 1) == "tollgate.yaml");

  // Secrets reach the environment; the admin key among them.
  CHECK(container.at("envFrom").at(0).at("secretRef").at("name") == secret.at("metadata").at("name"));
  CHECK(secret.at("stringData").as_object().contains("TOLLGATE_ADMIN_KEY"));

  // SIGTERM drain: Kubernetes waits past the preStop sleep plus Tollgate's grace.
  std::int64_t pre_stop = 0;
  if (auto lifecycle = container.if_contains("lifecycle")) {
    auto& cmd = lifecycle->at("preStop").at("exec").at("command").as_array();
    REQUIRE(cmd.size() == 2);
    CHECK(cmd[0] == "sleep");
    pre_stop = std::stol(str(cmd[1]));
  }
  CHECK(pod.at("terminationGracePeriodSeconds").as_int64() > pre_stop + grace);

  // The GPU variant patches the same container with the CUDA image and a GPU.
  auto patch = yaml_document(source_path("compose/k8s/gpu/gpu-patch.yaml"));
  auto& gpu_container = patch.at("spec").at("template").at("spec").at("containers").at(0);
  CHECK(gpu_container.at("name") == container.at("name"));
  CHECK(patch.at("metadata").at("name") == sts.at("metadata").at("name"));
  CHECK(gpu_container.at("resources").at("limits").at("nvidia.com/gpu") == 1);

  // kustomize resources exist.
  for (const char* k : {"compose/k8s/kustomization.yaml", "compose/k8s/gpu/kustomization.yaml"}) {
    auto kust = yaml_document(source_path(k));
    auto base = parent_dir(source_path(k));
    for (const auto& res : kust.at("resources").as_array()) {
      INFO(k << ": " << str(res));
      CHECK(std::filesystem::exists(base + "/" + str(res)));
    }
  }
}

TEST_CASE("the multi-replica Kubernetes option: three replicas on PostgreSQL, a PDB, readiness, the URL from a Secret",
          "[e2e][k8s]") {
  TempDir dir;
  const std::string base = source_path("compose/k8s/replicas");
  json::array docs;
  auto kust = yaml_document(base + "/kustomization.yaml");
  for (const auto& res : kust.at("resources").as_array()) {
    for (auto& d : yaml_documents(base + "/" + str(res))) docs.push_back(d);
  }
  auto configmap = find_kind(docs, "ConfigMap");
  auto secret = find_kind(docs, "Secret");
  auto deployment = find_kind(docs, "Deployment");
  auto pdb = find_kind(docs, "PodDisruptionBudget");
  for (const auto& d : docs) CHECK(d.at("kind") != "StatefulSet");

  // The carried tollgate.yaml is valid with the Secret as the environment, and
  // its database is the Secret's PostgreSQL URL.
  auto config_text = str(configmap.at("data").at("tollgate.yaml"));
  write_text(dir.file("tollgate.yaml"), config_text);
  EnvVars env;
  for (const auto& [k, v] : secret.at("stringData").as_object()) env.emplace_back(std::string(k), str(v));
  auto check = run_tollgate({"config", "check", dir.file("tollgate.yaml")}, 30s, env);
  INFO(check.out << check.err);
  REQUIRE(check.exit_code == 0);
  auto config = yaml_document(dir.file("tollgate.yaml")).as_object();
  std::smatch var;
  const std::string database = str(config.at("database"));
  REQUIRE(std::regex_match(database, var, std::regex(R"(\$\{([A-Z_]+)\})")));
  REQUIRE(secret.at("stringData").as_object().contains(var[1].str()));
  CHECK(str(secret.at("stringData").at(var[1].str())).starts_with("postgresql://"));
  const auto listen_port = std::stoi(port_of(str(config.at("listen"))));
  const auto grace = duration_seconds(str(config.at("limits").at("shutdown_grace")));

  auto& spec = deployment.at("spec").as_object();
  CHECK(spec.at("replicas") == 3);
  CHECK(spec.at("strategy").at("type") == "RollingUpdate");
  CHECK(spec.at("strategy").at("rollingUpdate").at("maxUnavailable") == 0);
  auto& labels = spec.at("template").at("metadata").at("labels");
  CHECK(spec.at("selector").at("matchLabels") == labels);
  auto& pod = spec.at("template").at("spec").as_object();
  CHECK_FALSE(spec.contains("volumeClaimTemplates"));
  auto& container = pod.at("containers").at(0).as_object();
  CHECK(container.at("envFrom").at(0).at("secretRef").at("name") == secret.at("metadata").at("name"));
  std::map<std::string, std::int64_t> ports;
  for (const auto& p : container.at("ports").as_array()) ports[str(p.at("name"))] = p.at("containerPort").as_int64();
  CHECK(ports.at("http") == listen_port);
  CHECK(container.at("readinessProbe").at("httpGet").at("path") == "/readyz");
  CHECK(container.at("readinessProbe").at("httpGet").at("port") == "http");
  CHECK(container.at("livenessProbe").at("httpGet").at("path") == "/healthz");
  std::set<std::string> volumes;
  for (const auto& v : pod.at("volumes").as_array()) volumes.insert(str(v.at("name")));
  for (const auto& m : container.at("volumeMounts").as_array()) CHECK(volumes.contains(str(m.at("name"))));
  auto& cmd = container.at("lifecycle").at("preStop").at("exec").at("command").as_array();
  CHECK(pod.at("terminationGracePeriodSeconds").as_int64() > std::stol(str(cmd.at(1))) + grace);

  // The PDB covers these pods and leaves a drain room to move one.
  CHECK(pdb.at("spec").at("selector").at("matchLabels") == labels);
  const auto min_available = pdb.at("spec").at("minAvailable").as_int64();
  CHECK(min_available >= 1);
  CHECK(min_available < spec.at("replicas").as_int64());
  for (const auto& d : docs) {
    if (d.at("kind") != "Service") continue;
    CHECK(d.at("spec").at("selector") == labels);
    CHECK(d.at("spec").at("ports").at(0).at("targetPort") == "http");
  }
}

TEST_CASE("docker-compose.replicas.yml: PostgreSQL with a health check, two replicas on it, nginx and Prometheus "
          "reaching each",
          "[e2e][compose]") {
  REQUIRE(run_command("command -v docker-compose").exit_code == 0);
  TempDir dir;
  auto compose_file = source_path("compose/docker-compose.replicas.yml");
  std::string clean_env =
      "env -u TOLLGATE_ADMIN_KEY -u GRAFANA_ADMIN_PASSWORD -u GROQ_API_KEY -u OPENAI_API_KEY -u POSTGRES_PASSWORD ";
  write_text(dir.file("empty.env"), "");
  auto bare = run_command(clean_env + "docker-compose --env-file " + shell_quote(dir.file("empty.env")) + " -f " +
                              shell_quote(compose_file) + " config",
                          60);
  CHECK(bare.exit_code != 0);
  auto rendered = dir.file("compose.rendered.yml");
  auto r = run_command(clean_env + "docker-compose --env-file " + shell_quote(source_path("compose/.env.example")) +
                           " -f " + shell_quote(compose_file) + " config > " + shell_quote(rendered),
                       60);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  auto compose = yaml_document(rendered).as_object();
  auto& services = compose.at("services").as_object();

  // PostgreSQL: the official image, its data on a volume, a health check the replicas wait for.
  auto& pg = services.at("postgres").as_object();
  CHECK(str(pg.at("image")).starts_with("postgres:"));
  CHECK(pg.contains("healthcheck"));
  bool data_on_volume = false;
  for (const auto& v : pg.at("volumes").as_array()) {
    const std::string text = v.is_object() ? str(v.at("source")) + ":" + str(v.at("target")) : str(v);
    data_on_volume = data_on_volume || text.starts_with("postgres-data:/var/lib/postgresql/data");
  }
  CHECK(data_on_volume);
  auto& tg = services.at("tollgate").as_object();
  CHECK(tg.at("deploy").at("replicas") == 2);
  CHECK(tg.at("depends_on").at("postgres").at("condition") == "service_healthy");

  // The replicas' config: valid, on this PostgreSQL, with its password from the environment.
  const std::string config_file = source_path("compose/tollgate-replicas.yaml");
  EnvVars env = {{"GROQ_API_KEY", "gsk-test"}, {"OPENAI_API_KEY", "sk-test"}, {"POSTGRES_PASSWORD", "secret"}};
  auto check = run_tollgate({"config", "check", config_file}, 30s, env);
  INFO(check.out << check.err);
  CHECK(check.exit_code == 0);
  auto tollgate_yaml = yaml_document(config_file).as_object();
  const std::string database = str(tollgate_yaml.at("database"));
  CHECK(database.starts_with("postgresql://" + str(pg.at("environment").at("POSTGRES_USER")) +
                             ":${POSTGRES_PASSWORD}@postgres:5432/" + str(pg.at("environment").at("POSTGRES_DB"))));
  CHECK(tg.at("environment").as_object().contains("POSTGRES_PASSWORD"));
  bool config_mounted = false;
  for (const auto& v : tg.at("volumes").as_array()) {
    const std::string text = v.is_object() ? str(v.at("source")) + ":" + str(v.at("target")) : str(v);
    config_mounted = config_mounted || text.find("tollgate-replicas.yaml:/etc/tollgate/tollgate.yaml") !=
                                           std::string::npos;
  }
  CHECK(config_mounted);
  const auto listen_port = port_of(str(tollgate_yaml.at("listen")));

  // nginx reaches the service name (every replica); Prometheus finds each replica by it.
  CHECK(str(services.at("nginx").at("environment").at("TOLLGATE_UPSTREAM")) == "tollgate:" + listen_port);
  const std::string prom_file = source_path("compose/prometheus/prometheus-replicas.yml");
  auto prom = yaml_document(prom_file);
  auto& sd = prom.at("scrape_configs").at(0).at("dns_sd_configs").at(0);
  CHECK(str(sd.at("names").at(0)) == "tollgate");
  CHECK(std::to_string(sd.at("port").as_int64()) == listen_port);
  auto promtool = run_command("promtool check config " + shell_quote(prom_file), 60);
  INFO(promtool.output);
  CHECK(promtool.exit_code == 0);
}

TEST_CASE("the Dockerfiles install what the binary links and run it as Tollgate expects", "[e2e][compose]") {
  // No container engine here: the Dockerfiles are checked against the binary
  // and the config instead of being built.
  auto runtime_stage = [](const std::string& dockerfile) {
    auto text = read_text(dockerfile);
    auto last_from = text.rfind("\nFROM ");
    REQUIRE(last_from != std::string::npos);
    return text.substr(last_from);
  };
  auto cpu = runtime_stage(source_path("compose/Dockerfile"));
  auto cuda = runtime_stage(source_path("compose/Dockerfile.cuda"));
  auto listen_port = port_of(str(yaml_document(source_path("compose/tollgate.yaml")).at("listen")));

  // Every shared library `tollgate` links directly (its NEEDED entries), by its
  // Debian package, is named in the Debian runtime stage (the base image's own
  // libc, libstdc++, libgcc aside); apt brings what those libraries link.
  auto needed = run_command("objdump -p " + shell_quote(TOLLGATE_BINARY) + " | awk '$1 == \"NEEDED\" {print $2}'", 30);
  REQUIRE(needed.exit_code == 0);
  std::set<std::string> direct;
  std::istringstream needed_lines(needed.output);
  for (std::string soname; std::getline(needed_lines, soname);) direct.insert(soname);
  REQUIRE(direct.contains("libsqlite3.so.0"));
  auto ldd = run_command("ldd " + shell_quote(TOLLGATE_BINARY), 30);
  REQUIRE(ldd.exit_code == 0);
  std::set<std::string> packages;
  std::regex lib_path(R"((\S+) => (/\S+))");
  for (std::sregex_iterator it(ldd.output.begin(), ldd.output.end(), lib_path), end; it != end; ++it) {
    if (!direct.contains((*it)[1].str())) continue;
    auto path = (*it)[2].str();
    auto owner = run_command("dpkg -S " + shell_quote(path) + " 2>/dev/null || dpkg -S \"$(realpath " +
                             shell_quote(path) + ")\" 2>/dev/null");
    REQUIRE(owner.exit_code == 0);
    packages.insert(owner.output.substr(0, owner.output.find_first_of(":")));
  }
  REQUIRE(packages.contains("libsqlite3-0"));
  if (packages.contains("libasan8")) {
    // A sanitizer build links its runtimes (and, through them, more of Boost)
    // where the image's Release build does not: only a plain build says what
    // the image needs. The plain test run checks it.
    WARN("sanitizer build: the runtime packages are checked by the plain build's run");
  } else {
    for (const auto& p : packages) {
      if (p == "libc6" || p == "libstdc++6" || p == "libgcc-s1") continue;
      INFO(p);
      CHECK(cpu.find(" " + p + " ") != std::string::npos);
    }
  }

  for (const auto& stage : {cpu, cuda}) {
    CHECK(std::regex_search(stage, std::regex(R"(\nUSER [a-z])")));  // not root
    CHECK(stage.find("EXPOSE " + listen_port) != std::string::npos);
    CHECK(std::regex_search(stage, std::regex("HEALTHCHECK [^\\n]*\\\\\\n[^\\n]*127\\.0\\.0\\.1:" + listen_port +
                                              "/healthz")));
    CHECK(stage.find(R"(ENTRYPOINT ["tollgate"])") != std::string::npos);
    CHECK(stage.find(R"(CMD ["serve", "--config", "/etc/tollgate/tollgate.yaml"])") != std::string::npos);
  }
  CHECK(cuda.find("FROM nvidia/cuda:${CUDA_VERSION}-runtime-") != std::string::npos);
}
