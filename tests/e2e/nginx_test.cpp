// The shipped nginx/tollgate.conf, rendered with a certificate made here and
// loopback ports, in front of the real Tollgate: `nginx -t`, a stream that
// arrives over TLS chunk by chunk, errors that pass through unchanged, and the
// body-size limit at the edge. Clients are curl processes (TLS, HTTP/2).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <map>
#include <memory>
#include <thread>

#include "deploy_support.hpp"
#include "harness.hpp"

using namespace tollgate::test;
using namespace tollgate::test::deploy;
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

struct TlsFiles {
  std::string cert, key;
};

TlsFiles make_certificate(const TempDir& dir) {
  TlsFiles f{dir.file("tls.crt"), dir.file("tls.key")};
  auto r = run_command("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
                       "-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout " +
                       shell_quote(f.key) + " -out " + shell_quote(f.cert));
  if (r.exit_code != 0) throw std::runtime_error("openssl failed: " + r.output);
  return f;
}

// nginx/tollgate.conf with its ${...} placeholders filled in, inside a main
// config that keeps pid, logs and temp files in `prefix`.
std::string render_nginx(const std::string& prefix, const TlsFiles& tls, std::uint16_t upstream_port,
                         std::uint16_t https_port, std::uint16_t http_port) {
  std::filesystem::create_directories(prefix + "/logs");
  auto conf = read_text(source_path("nginx/tollgate.conf"));
  REQUIRE(replace_all(conf, "${TOLLGATE_UPSTREAM}", "127.0.0.1:" + std::to_string(upstream_port)) > 0);
  REQUIRE(replace_all(conf, "${NGINX_HTTPS_LISTEN}", "127.0.0.1:" + std::to_string(https_port)) > 0);
  REQUIRE(replace_all(conf, "${NGINX_HTTP_LISTEN}", "127.0.0.1:" + std::to_string(http_port)) > 0);
  REQUIRE(replace_all(conf, "${TLS_CERT}", tls.cert) > 0);
  REQUIRE(replace_all(conf, "${TLS_KEY}", tls.key) > 0);
  REQUIRE(replace_all(conf, "${NGINX_CONN_LIMIT}", "100") > 0);
  // Every placeholder outside comments is one the README documents and the test fills.
  std::istringstream lines(conf);
  std::string line;
  while (std::getline(lines, line)) {
    auto code = line.substr(0, line.find('#'));
    INFO(line);
    CHECK(code.find("${") == std::string::npos);
  }
  write_text(prefix + "/tollgate.conf", conf);

  std::string main;
  // As root nginx drops its workers to an unprivileged user: nobody, as a
  // packaged nginx would use www-data. The master creates the temp dirs for it.
  if (geteuid() == 0) main += "user nobody nogroup;\n";
  main += "worker_processes 1;\ndaemon off;\npid " + prefix + "/nginx.pid;\nerror_log " + prefix +
          "/logs/error.log warn;\nevents { worker_connections 256; }\nhttp {\n  access_log off;\n"
          "  client_body_temp_path " + prefix + "/body;\n  proxy_temp_path " + prefix + "/proxy;\n"
          "  fastcgi_temp_path " + prefix + "/fastcgi;\n  uwsgi_temp_path " + prefix + "/uwsgi;\n"
          "  scgi_temp_path " + prefix + "/scgi;\n  include " + prefix + "/tollgate.conf;\n}\n";
  write_text(prefix + "/nginx.conf", main);
  return prefix + "/nginx.conf";
}

struct CurlResult {
  int status = 0;
  std::string http_version;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
};

// One request through curl; `args` are extra curl arguments (quoted by the caller).
CurlResult curl(const TempDir& dir, const std::string& ca, const std::string& url, const std::string& args) {
  static int counter = 0;
  auto tag = std::to_string(counter++);
  auto head = dir.file("curl-head-" + tag), body = dir.file("curl-body-" + tag);
  auto r = run_command("curl -sS --max-time 60 --cacert " + shell_quote(ca) + " -D " + shell_quote(head) + " -o " +
                           shell_quote(body) + " -w '%{http_code} %{http_version}' " + args + " " + shell_quote(url),
                       90);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CurlResult c;
  std::istringstream status(r.output);
  status >> c.status >> c.http_version;
  std::istringstream lines(read_text(head));
  std::string line;
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    auto colon = line.find(':');
    if (colon == std::string::npos || line.rfind("HTTP/", 0) == 0) continue;
    auto name = line.substr(0, colon);
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    auto value = line.substr(colon + 1);
    value.erase(0, value.find_first_not_of(' '));
    c.headers[name] = value;
  }
  c.body = read_text(body);
  return c;
}

// nginx from the shipped config in front of the gateway on `upstream_port`.
class NginxFront {
 public:
  NginxFront(const TempDir& dir, std::uint16_t upstream_port) : dir_(dir), tls_(make_certificate(dir)) {
    auto prefix = dir.file("nginx");
    // A port found free can be taken before nginx binds it: a few fresh tries.
    for (int attempt = 0; attempt < 3; ++attempt) {
      https_port_ = free_port();
      auto conf = render_nginx(prefix, tls_, upstream_port, https_port_, free_port());
      process_ = std::make_unique<ChildProcess>(
          "/usr/sbin/nginx -p " + shell_quote(prefix) + " -c " + shell_quote(conf), prefix + "/logs/stdout.log");
      if (wait_ready()) return;
      process_.reset();
    }
    FAIL("nginx did not come up: " << read_text(prefix + "/logs/error.log"));
  }

  std::string url(const std::string& path) const { return "https://127.0.0.1:" + std::to_string(https_port_) + path; }
  const std::string& ca() const { return tls_.cert; }
  CurlResult request(const std::string& path, const std::string& args = "") const {
    return curl(dir_, tls_.cert, url(path), args);
  }

 private:
  bool wait_ready() {
    auto deadline = Clock::now() + 20s;
    while (Clock::now() < deadline && process_->running()) {
      auto r = run_command("curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert " + shell_quote(tls_.cert) +
                               " " + shell_quote(url("/healthz")),
                           10);
      if (r.output == "200") return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }

  const TempDir& dir_;
  TlsFiles tls_;
  std::uint16_t https_port_ = 0;
  std::unique_ptr<ChildProcess> process_;
};

const char* kEchoConfig = R"(
limits: {max_body: 4MiB}
backends:
  - {name: echo, type: echo, token_delay: 200ms}
models:
  - name: echo
    deployments: [{backend: echo}]
)";

GatewayProcess::Options echo_options() {
  GatewayProcess::Options o;
  o.config_yaml = kEchoConfig;
  return o;
}

std::string auth(const std::string& key) { return "-H " + shell_quote("Authorization: Bearer " + key); }

}  // namespace

TEST_CASE("the shipped nginx config passes nginx -t", "[e2e][nginx]") {
  TempDir dir;
  auto tls = make_certificate(dir);
  auto prefix = dir.file("nginx");
  auto conf = render_nginx(prefix, tls, 8080, free_port(), free_port());
  auto r = run_command("/usr/sbin/nginx -t -p " + shell_quote(prefix) + " -c " + shell_quote(conf), 30);
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK(r.output.find("test is successful") != std::string::npos);

  // The checks this config exists for are in the file, not only in the docs.
  auto shipped = read_text(source_path("nginx/tollgate.conf"));
  CHECK(shipped.find("listen ${NGINX_HTTPS_LISTEN} ssl http2;") != std::string::npos);
  CHECK(shipped.find("proxy_buffering off;") != std::string::npos);
  CHECK(shipped.find("client_max_body_size 4m;") != std::string::npos);
  CHECK(shipped.find("keepalive 64;") != std::string::npos);
  CHECK(shipped.find("limit_conn tollgate_conn_per_ip") != std::string::npos);
  CHECK(shipped.find("proxy_set_header X-Forwarded-For") != std::string::npos);
  CHECK(shipped.find("proxy_set_header X-Real-IP") != std::string::npos);
}

TEST_CASE("through nginx over TLS and HTTP/2 a streamed completion arrives chunk by chunk", "[e2e][nginx]") {
  TempDir dir;
  GatewayProcess gw(dir, echo_options());
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  NginxFront nginx(dir, gw.port());

  auto models = nginx.request("/v1/models", auth(key));
  CHECK(models.status == 200);
  CHECK(models.http_version == "2");  // HTTP/2 negotiated by ALPN

  // Twelve words at 200 ms each: the gateway needs at least 2.2 s between the
  // first token and the last. A buffering proxy delivers them together; nginx
  // 1.22 buffers for HTTP/1.1 clients and not for HTTP/2 ones, so both.
  const int words = 12;
  std::string content;
  for (int i = 0; i < words; ++i) content += (i ? " w" : "w") + std::to_string(i);
  auto body = R"({"model":"echo","stream":true,"messages":[{"role":"user","content":")" + content + R"("}]})";
  for (std::string version : {"--http1.1", "--http2"}) {
    INFO(version);
    std::string command = "timeout -s KILL 60 curl " + version + " -sSN --max-time 50 --cacert " +
                          shell_quote(nginx.ca()) + " " + auth(key) + " -d " + shell_quote(body) + " " +
                          shell_quote(nginx.url("/v1/chat/completions")) + " 2>&1";
    FILE* pipe = popen(command.c_str(), "r");
    REQUIRE(pipe != nullptr);
    std::vector<Clock::time_point> content_chunks;
    std::string text, transcript;
    bool done = false;
    char line[65536];
    while (fgets(line, sizeof line, pipe)) {
      auto at = Clock::now();
      std::string l(line);
      transcript += l;
      if (l.rfind("data: [DONE]", 0) == 0) {
        done = true;
      } else if (l.rfind("data: ", 0) == 0) {
        auto chunk = json::parse(l.substr(6));
        auto& delta = chunk.at("choices").at(0).at("delta").as_object();
        if (auto c = delta.if_contains("content"); c && !c->as_string().empty()) {
          text += c->as_string();
          content_chunks.push_back(at);
        }
      }
    }
    pclose(pipe);
    INFO(transcript);
    CHECK(done);
    CHECK(text == content);
    REQUIRE(content_chunks.size() == static_cast<std::size_t>(words));
    // The first token was read while the gateway was still producing the rest.
    // Buffered, all arrive within a few milliseconds; streamed, they span the
    // production time (2.2 s). A quarter of it leaves room for a reader that a
    // loaded machine deschedules for a while.
    std::string offsets;
    for (auto t : content_chunks) {
      offsets += std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(t - content_chunks[0]).count()) +
                 "ms ";
    }
    INFO("arrivals after the first: " << offsets);
    auto spread = content_chunks.back() - content_chunks.front();
    CHECK(spread >= (words - 1) * 200ms / 4);
  }
}

TEST_CASE("through nginx 401 and 429 answers pass unchanged and /metrics stays inside", "[e2e][nginx]") {
  TempDir dir;
  GatewayProcess gw(dir, echo_options());
  // A daily limit: no window rolls over between the edge's 429 and the direct one.
  auto key = create_key(gw.db(), "bob", {"--rpd", "1"});
  wait_for_key(gw.port(), key);
  NginxFront nginx(dir, gw.port());

  SECTION("401") {
    auto edge = nginx.request("/v1/chat/completions", auth("tg-notakey") + " -d " +
                                                          shell_quote(chat_body("echo", "hi")));
    HttpClient direct(gw.port());
    auto origin = direct.post("/v1/chat/completions", "tg-notakey", chat_body("echo", "hi"));
    CHECK(edge.status == 401);
    CHECK(origin.status == 401);
    CHECK(edge.headers["content-type"] == "application/json");
    CHECK(json::parse(edge.body) == origin.json());
    CHECK(json::parse(edge.body).at("error").at("type") == "authentication_error");
  }

  SECTION("429 with Retry-After and x-ratelimit headers") {
    // Whatever wait_for_key spent, the key is at or over its one request of
    // the day: requests until nginx passes a 429 on (bounded).
    CurlResult edge;
    for (int i = 0; i < 3 && edge.status != 429; ++i) {
      edge = nginx.request("/v1/chat/completions", auth(key) + " -d " + shell_quote(chat_body("echo", "hi")));
      if (edge.status != 429) REQUIRE(edge.status == 200);
    }
    REQUIRE(edge.status == 429);
    HttpClient direct(gw.port());
    auto origin = direct.post("/v1/chat/completions", key, chat_body("echo", "hi"));
    REQUIRE(origin.status == 429);
    auto edge_error = json::parse(edge.body).at("error");
    CHECK(edge.headers["content-type"] == "application/json");
    CHECK(edge_error.at("type") == origin.json().at("error").at("type"));
    CHECK(edge_error.at("code") == origin.json().at("error").at("code"));
    CHECK(edge_error.at("message") == origin.json().at("error").at("message"));
    REQUIRE(edge.headers.count("retry-after") == 1);
    CHECK(std::stoi(edge.headers["retry-after"]) >= 1);
    CHECK(edge.headers["x-ratelimit-limit-requests"] == "1");
    CHECK(edge.headers["x-ratelimit-remaining-requests"] == "0");
    CHECK_FALSE(edge.headers["x-ratelimit-reset-requests"].empty());
    CHECK_FALSE(origin.header("x-ratelimit-reset-requests").empty());
  }

  SECTION("/metrics is not served to the outside") {
    auto edge = nginx.request("/metrics");
    CHECK(edge.status == 404);
    CHECK(edge.body.find("tollgate_http_requests_total") == std::string::npos);
  }
}

TEST_CASE("through nginx a 3 MiB body reaches Tollgate and a 5 MiB body gets the edge's 413", "[e2e][nginx]") {
  TempDir dir;
  GatewayProcess gw(dir, echo_options());
  auto key = create_key(gw.db(), "carol");
  wait_for_key(gw.port(), key);
  NginxFront nginx(dir, gw.port());

  auto body_of = [](std::size_t bytes) {
    std::string words;
    while (words.size() + 100 < bytes) words += "word ";
    return R"({"model":"echo","max_tokens":3,"messages":[{"role":"user","content":")" + words + R"("}]})";
  };
  auto three = dir.file("three.json"), five = dir.file("five.json");
  write_text(three, body_of(3 * 1024 * 1024));
  write_text(five, body_of(5 * 1024 * 1024));

  auto passed = nginx.request("/v1/chat/completions", auth(key) + " --data-binary @" + shell_quote(three));
  INFO(passed.body.substr(0, 500));
  REQUIRE(passed.status == 200);
  auto answer = json::parse(passed.body);
  CHECK(answer.at("choices").at(0).at("message").at("content") == "word word word");
  CHECK(answer.at("usage").at("prompt_tokens").as_int64() > 500'000);

  auto refused = nginx.request("/v1/chat/completions", auth(key) + " --data-binary @" + shell_quote(five));
  CHECK(refused.status == 413);
  CHECK(json::parse(refused.body).at("error").at("code") == "body_too_large");
  // nginx refused it, not Tollgate: the gateway counted no 413.
  auto metrics = HttpClient(gw.port()).get("/metrics").body;
  CHECK(metrics.find(R"(status="413")") == std::string::npos);
  CHECK(metrics.find(R"(tollgate_http_requests_total{route="/v1/chat/completions",status="200"})") !=
        std::string::npos);
}

TEST_CASE("through nginx the app behind Tollgate sees https and nginx's client address and not a spoofed one",
          "[e2e][nginx]") {
  TempDir dir;
  // fake_app.py (the app proxy tests' echo app) prints its port first.
  ChildProcess app("python3 " + shell_quote(source_path("tests/e2e/fake_app.py")), dir.file("app.log"));
  std::string port_line;
  auto deadline = Clock::now() + 15s;
  while (port_line.find('\n') == std::string::npos && Clock::now() < deadline && app.running()) {
    port_line = app.log();
    std::this_thread::sleep_for(20ms);
  }
  REQUIRE(port_line.find('\n') != std::string::npos);
  GatewayProcess::Options o;
  o.config_yaml = std::string(kEchoConfig) + "app_upstream: http://127.0.0.1:" +
                  port_line.substr(0, port_line.find('\n')) +
                  "\npublic_paths: [\"/public/*\"]\ntrusted_proxies: [127.0.0.1]\n";
  GatewayProcess gw(dir, o);
  NginxFront nginx(dir, gw.port());

  auto r = nginx.request("/public/hello", "-H 'X-Forwarded-For: 6.6.6.6' -H 'X-Real-IP: 6.6.6.6'");
  INFO(r.body);
  REQUIRE(r.status == 200);
  std::map<std::string, std::string> seen;
  auto echoed = json::parse(r.body);
  for (const auto& h : echoed.at("headers").as_array()) {
    auto name = std::string(h.at(0).as_string());
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    seen[name] = std::string(h.at(1).as_string());
  }
  // nginx replaced the client's X-Forwarded-For with the address it saw;
  // Tollgate, trusting nginx, appended nginx's own.
  CHECK(seen["x-forwarded-for"] == "127.0.0.1, 127.0.0.1");
  CHECK(seen["x-real-ip"] == "127.0.0.1");
  CHECK(seen["x-forwarded-proto"] == "https");
  CHECK(seen["x-forwarded-host"] == "127.0.0.1");
}
