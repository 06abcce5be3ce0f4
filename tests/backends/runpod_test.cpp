// The `runpod` backend against a fake serverless endpoint on loopback: the
// job API's calls (runsync, run, status, stream, cancel), the output shapes,
// usage, error mapping, the credentials kept secret, and its config section.
#include "backends/runpod.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "backends/config_reader.hpp"
#include "backends/openai_compatible.hpp"

using namespace tollgate::backends;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

namespace {

constexpr auto as_tuple = net::as_tuple(net::use_awaitable);
// Far longer than any call below takes; a call that never ends runs into it.
constexpr auto kBound = 10s;
const std::string kApiKey = "rp-secret-key-0123456789abcdef";

struct Seen {
  std::string method;
  std::string target;
  std::string body;
  std::string authorization;
};

struct Answer {
  int status = 200;
  std::string body;
  std::string retry_after;
};

// A serverless endpoint on a loopback port: `script` answers each request
// (on the fake's one thread, so it may keep state); every request is recorded.
class FakeServerless {
 public:
  using Script = std::function<Answer(const Seen&)>;

  explicit FakeServerless(Script script)
      : script_(std::move(script)), acceptor_(ioc_, {net::ip::make_address("127.0.0.1"), 0}) {
    net::co_spawn(ioc_, accept_loop(this), net::detached);
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~FakeServerless() {
    ioc_.stop();
    thread_.join();
  }

  std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port()) + "/v2";
  }
  std::vector<Seen> seen() {
    std::lock_guard lock(mutex_);
    return seen_;
  }
  std::vector<std::string> targets() {
    std::vector<std::string> out;
    for (const auto& s : seen()) out.push_back(s.method + " " + s.target);
    return out;
  }
  // Waits (bounded) until a request to `target` came.
  bool wait_for(const std::string& method_target) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, kBound, [&] {
      for (const auto& s : seen_) {
        if (s.method + " " + s.target == method_target) return true;
      }
      return false;
    });
  }

 private:
  static net::awaitable<void> accept_loop(FakeServerless* self) {
    for (;;) {
      auto [ec, socket] = co_await self->acceptor_.async_accept(as_tuple);
      if (ec) co_return;
      net::co_spawn(self->ioc_, serve(self, std::move(socket)), net::detached);
    }
  }

  static net::awaitable<void> serve(FakeServerless* self, tcp::socket socket) {
    beast::flat_buffer buffer;
    for (int i = 0; i < 1000; ++i) {
      http::request<http::string_body> request;
      auto [read_ec, read_n] = co_await http::async_read(socket, buffer, request, as_tuple);
      if (read_ec) co_return;
      Seen seen{std::string(request.method_string()), std::string(request.target()), request.body(),
                std::string(request[http::field::authorization])};
      {
        std::lock_guard lock(self->mutex_);
        self->seen_.push_back(seen);
      }
      self->changed_.notify_all();
      Answer answer = self->script_(seen);
      http::response<http::string_body> response{static_cast<http::status>(answer.status), 11};
      response.set(http::field::content_type, "application/json");
      if (!answer.retry_after.empty()) response.set(http::field::retry_after, answer.retry_after);
      response.body() = answer.body;
      response.keep_alive(true);
      response.prepare_payload();
      auto [write_ec, write_n] = co_await http::async_write(socket, response, as_tuple);
      if (write_ec) co_return;
    }
  }

  Script script_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Seen> seen_;
  std::thread thread_;
};

class CollectingSink final : public CompletionSink {
 public:
  void on_event(CompletionEvent event) override {
    std::lock_guard lock(mutex_);
    if (event.type == CompletionEvent::Type::delta) {
      deltas_.push_back(event.text);
    } else {
      final_ = std::move(event);
    }
    changed_.notify_all();
  }
  bool wait_final() {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, kBound, [this] { return final_.has_value(); });
  }
  std::vector<std::string> deltas() {
    std::lock_guard lock(mutex_);
    return deltas_;
  }
  std::optional<CompletionEvent> final_event() {
    std::lock_guard lock(mutex_);
    return final_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> deltas_;
  std::optional<CompletionEvent> final_;
};

RunpodConfig config_for(const FakeServerless& fake) {
  RunpodConfig c;
  c.name = "rp";
  c.base_url = fake.base_url();
  c.endpoint = "ep-1";
  c.api_key = kApiKey;
  c.connect_timeout = 5s;
  c.total_timeout = kBound;
  c.poll_interval = 20ms;
  return c;
}

CompletionRequest chat_request(bool stream = false) {
  CompletionRequest r;
  r.endpoint = Endpoint::chat_completions;
  r.model = "public";
  r.upstream_model = "upstream-model";
  r.messages = {{"system", "be brief"}, {"user", "say hello"}};
  r.stream = stream;
  return r;
}

struct Outcome {
  std::vector<std::string> deltas;
  CompletionEvent final_event;
  std::string text() const {
    std::string t;
    for (const auto& d : deltas) t += d;
    return t;
  }
};

Outcome run(const RunpodConfig& config, CompletionRequest request) {
  auto backend = make_runpod_backend(config);
  auto sink = std::make_shared<CollectingSink>();
  auto handle = backend->start(std::move(request), sink);
  REQUIRE(sink->wait_final());
  return {sink->deltas(), *sink->final_event()};
}

Answer completed(const std::string& output) {
  return {200, R"({"id":"job-1","status":"COMPLETED","output":)" + output + "}", ""};
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// `section` (one `backends` entry) read by the runpod type, at backends[0] of test.yaml.
std::shared_ptr<const BackendSpec> parse(const std::string& section) {
  auto node = YAML::Load(section);
  const auto* type = builtin_backend_types().find("runpod");
  REQUIRE(type);
  return type->parse(ConfigReader("test.yaml"), node, "backends[0]", node["name"].as<std::string>());
}

std::string parse_error(const std::string& section) {
  try {
    parse(section);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("runpod: runsync COMPLETED in one call, in each output shape", "[backends][runpod]") {
  struct Shape {
    const char* name;
    std::string output;
    std::string finish_reason;
    std::int64_t prompt_tokens;
    std::int64_t completion_tokens;
    bool estimated;
  };
  auto request = chat_request();
  const std::int64_t prompt_estimate = estimate_prompt_tokens(request);
  const Shape shapes[] = {
      {"tollgate",
       R"({"text":"Hello there","finish_reason":"length","usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}})",
       "length", 4, 2, false},
      {"worker-vllm", R"([{"choices":[{"tokens":["Hel","lo"," there"]}],"usage":{"input":5,"output":3}}])", "stop", 5,
       3, false},
      {"openai chat",
       R"({"choices":[{"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],)"
       R"("usage":{"prompt_tokens":6,"completion_tokens":2}})",
       "stop", 6, 2, false},
      // No usage: the prompt as estimated, ~4 bytes per completion token.
      {"string", R"("Hello there")", "stop", prompt_estimate, 2, true},
  };
  for (const auto& shape : shapes) {
    SECTION(shape.name) {
      FakeServerless fake([&](const Seen&) { return completed(shape.output); });
      auto outcome = run(config_for(fake), request);
      CHECK(outcome.text() == "Hello there");
      REQUIRE(outcome.final_event.type == CompletionEvent::Type::done);
      CHECK(outcome.final_event.finish_reason == shape.finish_reason);
      CHECK(outcome.final_event.usage.prompt_tokens == shape.prompt_tokens);
      CHECK(outcome.final_event.usage.completion_tokens == shape.completion_tokens);
      CHECK(outcome.final_event.usage.estimated == shape.estimated);
      auto seen = fake.seen();
      REQUIRE(seen.size() == 1);
      CHECK(seen[0].method == "POST");
      CHECK(seen[0].target == "/v2/ep-1/runsync");
      CHECK(seen[0].authorization == "Bearer " + kApiKey);
    }
  }
}

TEST_CASE("runpod: a queued job is polled on /status until COMPLETED", "[backends][runpod]") {
  int status_calls = 0;
  FakeServerless fake([&](const Seen& seen) -> Answer {
    if (seen.target == "/v2/ep-1/runsync") return {200, R"({"id":"job-7","status":"IN_QUEUE"})", ""};
    if (seen.target != "/v2/ep-1/status/job-7") return {404, R"({"error":"no such route"})", ""};
    if (++status_calls < 3) return {200, R"({"id":"job-7","status":"IN_PROGRESS"})", ""};
    return {200,
            R"({"id":"job-7","status":"COMPLETED","output":{"text":"polled answer","finish_reason":"stop",)"
            R"("usage":{"prompt_tokens":9,"completion_tokens":3}}})",
            ""};
  });
  auto request = chat_request();
  request.max_tokens = 7;
  request.temperature = 0.5;
  request.top_k = 40;
  request.seed = 42;
  request.stop = {"\n"};
  request.presence_penalty = 0.25;
  auto outcome = run(config_for(fake), request);
  CHECK(outcome.text() == "polled answer");
  REQUIRE(outcome.final_event.type == CompletionEvent::Type::done);
  CHECK(outcome.final_event.usage.prompt_tokens == 9);
  CHECK(outcome.final_event.usage.completion_tokens == 3);

  CHECK(fake.targets() == std::vector<std::string>{"POST /v2/ep-1/runsync", "GET /v2/ep-1/status/job-7",
                                                   "GET /v2/ep-1/status/job-7", "GET /v2/ep-1/status/job-7"});
  auto body = json::parse(fake.seen().at(0).body).as_object();
  CHECK(body.size() == 1);  // everything rides in `input`
  const auto& input = body.at("input").as_object();
  CHECK(input.at("model") == "upstream-model");
  CHECK(input.at("stream") == false);
  REQUIRE(input.at("messages").as_array().size() == 2);
  CHECK(input.at("messages").at(0).at("role") == "system");
  CHECK(input.at("messages").at(1).at("content") == "say hello");
  CHECK_FALSE(input.contains("prompt"));
  const auto& sampling = input.at("sampling_params").as_object();
  CHECK(sampling.at("max_tokens") == 7);
  CHECK(sampling.at("temperature") == 0.5);
  CHECK(sampling.at("top_k") == 40);
  CHECK(sampling.at("seed") == 42);
  CHECK(sampling.at("stop").at(0) == "\n");
  CHECK(sampling.at("presence_penalty") == 0.25);
  CHECK_FALSE(sampling.contains("top_p"));  // defaults are the worker's
  CHECK_FALSE(sampling.contains("frequency_penalty"));
}

TEST_CASE("runpod: a completions request sends its prompt, and nothing unset", "[backends][runpod]") {
  CompletionRequest r;
  r.endpoint = Endpoint::completions;
  r.model = "public";
  r.prompt = "once upon";
  r.stream = true;
  auto input = json::parse(runpod_job_body(r)).at("input").as_object();
  CHECK(input.at("prompt") == "once upon");
  CHECK(input.at("model") == "public");  // no deployment name: the public one
  CHECK(input.at("stream") == true);
  CHECK_FALSE(input.contains("messages"));
  CHECK_FALSE(input.contains("sampling_params"));
}

TEST_CASE("runpod: a streamed job's pieces arrive as deltas in order, then its usage", "[backends][runpod]") {
  int stream_calls = 0;
  FakeServerless fake([&](const Seen& seen) -> Answer {
    if (seen.target == "/v2/ep-1/run") return {200, R"({"id":"job-s","status":"IN_QUEUE"})", ""};
    if (seen.target != "/v2/ep-1/stream/job-s") return {404, "{}", ""};
    switch (++stream_calls) {
      case 1:
        return {200, R"({"status":"IN_QUEUE","stream":[]})", ""};
      case 2:
        return {200, R"({"status":"IN_PROGRESS","stream":[{"output":{"text":"Hel"}},{"output":{"text":"lo"}}]})", ""};
      case 3:
        return {200, R"({"status":"IN_PROGRESS","stream":[{"output":{"text":" str"}}]})", ""};
      default:
        return {200,
                R"({"status":"COMPLETED","stream":[{"output":{"text":"eam","finish_reason":"length",)"
                R"("usage":{"prompt_tokens":11,"completion_tokens":4}}}]})",
                ""};
    }
  });
  auto outcome = run(config_for(fake), chat_request(true));
  CHECK(outcome.deltas == std::vector<std::string>{"Hel", "lo", " str", "eam"});
  REQUIRE(outcome.final_event.type == CompletionEvent::Type::done);
  CHECK(outcome.final_event.finish_reason == "length");
  CHECK(outcome.final_event.usage.prompt_tokens == 11);
  CHECK(outcome.final_event.usage.completion_tokens == 4);
  CHECK_FALSE(outcome.final_event.usage.estimated);
  CHECK(stream_calls == 4);
  auto targets = fake.targets();
  REQUIRE(targets.size() == 5);
  CHECK(targets[0] == "POST /v2/ep-1/run");
  CHECK(targets[4] == "GET /v2/ep-1/stream/job-s");
  CHECK(json::parse(fake.seen().at(0).body).at("input").at("stream") == true);
}

TEST_CASE("runpod: worker-vllm stream pieces, usage from the last", "[backends][runpod]") {
  int stream_calls = 0;
  FakeServerless fake([&](const Seen& seen) -> Answer {
    if (seen.target == "/v2/ep-1/run") return {200, R"({"id":"job-v","status":"IN_PROGRESS"})", ""};
    if (++stream_calls == 1) {
      return {
          200,
          R"({"status":"IN_PROGRESS","stream":[{"output":{"choices":[{"tokens":["a","b"]}],"usage":{"input":3,"output":2}}}]})",
          ""};
    }
    return {
        200,
        R"({"status":"COMPLETED","stream":[{"output":{"choices":[{"tokens":["c"]}],"usage":{"input":3,"output":3}}}]})",
        ""};
  });
  auto outcome = run(config_for(fake), chat_request(true));
  CHECK(outcome.deltas == std::vector<std::string>{"ab", "c"});
  REQUIRE(outcome.final_event.type == CompletionEvent::Type::done);
  CHECK(outcome.final_event.usage.prompt_tokens == 3);
  CHECK(outcome.final_event.usage.completion_tokens == 3);
}

TEST_CASE("runpod: a FAILED job is an upstream error without the api key", "[backends][runpod]") {
  FakeServerless fake([](const Seen&) -> Answer {
    return {200, R"({"id":"job-f","status":"FAILED","error":"worker crashed: token )" + kApiKey + R"( was refused"})",
            ""};
  });
  auto outcome = run(config_for(fake), chat_request());
  REQUIRE(outcome.final_event.type == CompletionEvent::Type::error);
  CHECK(outcome.final_event.error.kind == ErrorKind::upstream_failed);
  CHECK(outcome.final_event.error.message == "the upstream job failed: worker crashed: token *** was refused");
  CHECK_FALSE(contains(outcome.final_event.error.message, kApiKey));
  CHECK_FALSE(contains(outcome.final_event.error.message, kApiKey.substr(0, 12)));
  CHECK(outcome.deltas.empty());
}

TEST_CASE("runpod: a job the upstream ends without completing maps to its error", "[backends][runpod]") {
  for (auto [status, kind] :
       {std::pair{"CANCELLED", ErrorKind::upstream_failed}, std::pair{"TIMED_OUT", ErrorKind::timeout}}) {
    FakeServerless fake([status = std::string(status)](const Seen&) -> Answer {
      return {200, R"({"id":"job-e","status":")" + status + R"("})", ""};
    });
    auto outcome = run(config_for(fake), chat_request(true));
    REQUIRE(outcome.final_event.type == CompletionEvent::Type::error);
    CHECK(outcome.final_event.error.kind == kind);
  }
}

TEST_CASE("runpod: HTTP errors map as the openai backend maps them", "[backends][runpod]") {
  SECTION("429: rate limited, with Retry-After") {
    FakeServerless fake([](const Seen&) -> Answer { return {429, R"({"error":"slow down"})", "3"}; });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::rate_limited);
    CHECK(e.error.retry_after_s == 3);
    CHECK(e.error.message == "upstream answered 429: slow down");
  }
  SECTION("500: the upstream failed") {
    FakeServerless fake([](const Seen&) -> Answer { return {500, R"({"error":"boom"})", ""}; });
    auto e = run(config_for(fake), chat_request(true)).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::upstream_failed);
    CHECK(e.error.message == "upstream answered 500: boom");
  }
  SECTION("401: our credentials, without the upstream's words") {
    FakeServerless fake([](const Seen&) -> Answer { return {401, R"({"error":"bad key )" + kApiKey + R"("})", ""}; });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::upstream_failed);
    CHECK(e.error.message == "the upstream refused the gateway's credentials (401)");
  }
  SECTION("404 on a status poll: not found") {
    FakeServerless fake([](const Seen& seen) -> Answer {
      if (seen.method == "POST") return {200, R"({"id":"job-n","status":"IN_QUEUE"})", ""};
      return {404, R"({"error":"job not found"})", ""};
    });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::not_found);
  }
}

TEST_CASE("runpod: the total timeout while IN_PROGRESS is a timeout, and the job is cancelled", "[backends][runpod]") {
  FakeServerless fake([](const Seen& seen) -> Answer {
    if (seen.method == "POST" && seen.target.starts_with("/v2/ep-1/cancel/")) {
      return {200, R"({"id":"job-t","status":"CANCELLED"})", ""};
    }
    return {200, R"({"id":"job-t","status":"IN_PROGRESS"})", ""};
  });
  auto config = config_for(fake);
  config.total_timeout = 300ms;
  auto started = std::chrono::steady_clock::now();
  auto e = run(config, chat_request()).final_event;
  CHECK(std::chrono::steady_clock::now() - started < 5s);
  REQUIRE(e.type == CompletionEvent::Type::error);
  CHECK(e.error.kind == ErrorKind::timeout);
  CHECK(e.error.message == "the upstream call exceeded the total timeout");
  CHECK(fake.wait_for("POST /v2/ep-1/cancel/job-t"));
  auto targets = fake.targets();
  CHECK(std::count(targets.begin(), targets.end(), "GET /v2/ep-1/status/job-t") >= 2);
}

TEST_CASE("runpod: a cancelled streamed call cancels its job upstream", "[backends][runpod]") {
  FakeServerless fake([](const Seen& seen) -> Answer {
    if (seen.target == "/v2/ep-1/run") return {200, R"({"id":"job-c","status":"IN_QUEUE"})", ""};
    return {200, R"({"status":"IN_PROGRESS","stream":[]})", ""};
  });
  auto backend = make_runpod_backend(config_for(fake));
  auto sink = std::make_shared<CollectingSink>();
  auto handle = backend->start(chat_request(true), sink);
  REQUIRE(fake.wait_for("GET /v2/ep-1/stream/job-c"));
  handle->cancel();
  CHECK(fake.wait_for("POST /v2/ep-1/cancel/job-c"));
  CHECK_FALSE(sink->final_event());  // a cancelled call sends nothing more
}

TEST_CASE("runpod: malformed answers are upstream errors", "[backends][runpod]") {
  SECTION("not JSON") {
    FakeServerless fake([](const Seen&) -> Answer { return {200, R"({"id":"job-m","status":"COMPL)", ""}; });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::upstream_failed);
    CHECK(e.error.message == "the upstream sent a malformed job answer (not a JSON object)");
  }
  SECTION("an output of no known shape") {
    FakeServerless fake([](const Seen&) { return completed(R"({"generated":"hi"})"); });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::upstream_failed);
    CHECK(e.error.message == "the upstream's output has none of the known shapes (it is an object)");
  }
  SECTION("an unknown status") {
    FakeServerless fake([](const Seen&) -> Answer { return {200, R"({"id":"job-u","status":"DANCING"})", ""}; });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.message == "the upstream's job has an unknown status");
  }
  SECTION("a stream piece without an output") {
    FakeServerless fake([](const Seen& seen) -> Answer {
      if (seen.target == "/v2/ep-1/run") return {200, R"({"id":"job-p","status":"IN_QUEUE"})", ""};
      return {200, R"({"status":"IN_PROGRESS","stream":[{"text":"loose"}]})", ""};
    });
    auto e = run(config_for(fake), chat_request(true)).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.message == "the upstream's stream holds a piece without an output");
  }
}

TEST_CASE("runpod: a hostile job id never reaches a path", "[backends][runpod]") {
  for (const char* id : {"../x", "a/b", "job?x=1", ""}) {
    FakeServerless fake([id = std::string(id)](const Seen&) -> Answer {
      return {200, R"({"id":")" + id + R"(","status":"IN_QUEUE"})", ""};
    });
    auto e = run(config_for(fake), chat_request()).final_event;
    REQUIRE(e.type == CompletionEvent::Type::error);
    CHECK(e.error.kind == ErrorKind::upstream_failed);
    CHECK(fake.targets() == std::vector<std::string>{"POST /v2/ep-1/runsync"});
  }
  CHECK(valid_runpod_id("c80ffee4-f315-4e25-a146-0f3d98263d8f-u1"));
  CHECK(valid_runpod_id(std::string(kMaxRunpodId, 'a')));
  CHECK_FALSE(valid_runpod_id(std::string(kMaxRunpodId + 1, 'a')));
  CHECK_FALSE(valid_runpod_id("../x"));
  CHECK_FALSE(valid_runpod_id("a b"));
  CHECK_FALSE(valid_runpod_id(""));
}

TEST_CASE("runpod: output shapes, and what is refused", "[backends][runpod]") {
  std::string error;
  auto tollgate = read_runpod_output(json::parse(R"({"text":"a","finish_reason":"length"})"), error);
  REQUIRE(tollgate);
  CHECK(tollgate->text == "a");
  CHECK(tollgate->finish_reason == "length");
  CHECK_FALSE(tollgate->usage);
  auto vllm =
      read_runpod_output(json::parse(R"({"choices":[{"tokens":["x","y"]}],"usage":{"input":1,"output":2}})"), error);
  REQUIRE(vllm);
  CHECK(vllm->text == "xy");
  CHECK(vllm->tokens == 2);
  CHECK(vllm->usage->completion_tokens == 2);
  auto delta = read_runpod_output(json::parse(R"({"choices":[{"delta":{"content":"d"}}]})"), error);
  REQUIRE(delta);
  CHECK(delta->text == "d");
  auto text = read_runpod_output(json::parse(R"({"choices":[{"text":"t","finish_reason":"stop"}]})"), error);
  REQUIRE(text);
  CHECK(text->text == "t");
  CHECK(text->finish_reason == "stop");
  for (const char* bad : {"42", "null", R"({"foo":1})", R"([{"text":"a"}])", R"({"choices":[]})",
                          R"({"choices":[{"tokens":[1]}]})", R"({"text":7})"}) {
    error.clear();
    CHECK_FALSE(read_runpod_output(json::parse(bad), error));
    CHECK_FALSE(error.empty());
  }
}

TEST_CASE("runpod: text only, and no embeddings", "[backends][runpod]") {
  FakeServerless fake([](const Seen&) { return completed(R"("never")"); });
  auto backend = make_runpod_backend(config_for(fake));
  CHECK(backend->type() == "runpod");
  CHECK_FALSE(backend->capabilities().embeddings);
  auto request = chat_request();
  request.non_text_content = true;
  auto sink = std::make_shared<CollectingSink>();
  auto handle = backend->start(request, sink);
  REQUIRE(sink->wait_final());
  CHECK(sink->final_event()->error.kind == ErrorKind::bad_request);
  request = chat_request();
  request.endpoint = Endpoint::embeddings;
  auto embed_sink = std::make_shared<CollectingSink>();
  auto embed = backend->embed(request, embed_sink);
  REQUIRE(embed_sink->wait_final());
  CHECK(embed_sink->final_event()->error.kind == ErrorKind::bad_request);
  CHECK(embed_sink->final_event()->error.message == "the model 'public' does not serve embeddings");
  CHECK(fake.seen().empty());
}

TEST_CASE("runpod: the config section, its defaults and its errors", "[backends][config][runpod]") {
  auto full = parse(
      "{name: rp, type: runpod, base_url: 'http://127.0.0.1:9/v2', endpoint: abc_DEF-9, api_key: k,\n"
      " timeouts: {connect: 2s, total: 90s}, poll_interval_ms: 250, max_connections: 8}");
  const auto* c = full->as<RunpodConfig>();
  REQUIRE(c);
  CHECK(c->name == "rp");
  CHECK(c->base_url == "http://127.0.0.1:9/v2");
  CHECK(c->endpoint == "abc_DEF-9");
  CHECK(c->api_key == "k");
  CHECK(c->connect_timeout == 2s);
  CHECK(c->total_timeout == 90s);
  CHECK(c->poll_interval == 250ms);
  CHECK(c->max_connections == 8);

  auto bare_spec = parse("{name: rp, type: runpod, endpoint: e1}");  // kept alive while read
  const auto* bare = bare_spec->as<RunpodConfig>();
  REQUIRE(bare);
  CHECK(bare->base_url == "https://api.runpod.ai/v2");
  CHECK(bare->poll_interval == 500ms);
  CHECK(bare->api_key.empty());
  CHECK(bare->total_timeout == RunpodConfig{}.total_timeout);

  CHECK(contains(parse_error("{name: rp, type: runpod}"), "test.yaml: backends[0]: missing key 'endpoint'"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: '../x'}"),
                 "backends[0].endpoint: must be 1 to 128 letters, digits, '_' or '-'"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: '" + std::string(129, 'a') + "'}"),
                 "backends[0].endpoint: must be 1 to 128"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, poll_interval_ms: 0}"),
                 "backends[0].poll_interval_ms: must be between 10 and 60000"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, poll_interval_ms: often}"),
                 "backends[0].poll_interval_ms: expected an integer, got 'often'"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, base_url: 'ftp://x'}"),
                 "backends[0].base_url: must start with http:// or https://"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, timeouts: {idle: 1s}}"),
                 "backends[0].timeouts: unknown key 'idle' (known keys: connect, total)"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, timeouts: {total: 0s}}"),
                 "backends[0].timeouts.total: must be positive"));
  CHECK(contains(parse_error("{name: rp, type: runpod, endpoint: e, headers: {X: y}}"),
                 "backends[0]: unknown key 'headers'"));
}

TEST_CASE("runpod: the api key comes from the environment", "[backends][config][runpod]") {
  ::setenv("TOLLGATE_TEST_RUNPOD_KEY", "rp-from-env", 1);
  auto spec = parse("{name: rp, type: runpod, endpoint: e, api_key: '${TOLLGATE_TEST_RUNPOD_KEY}'}");
  ::unsetenv("TOLLGATE_TEST_RUNPOD_KEY");
  REQUIRE(spec->as<RunpodConfig>());
  CHECK(spec->as<RunpodConfig>()->api_key == "rp-from-env");
}
