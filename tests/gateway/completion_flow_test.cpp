// The completion flow's fallback rules, with scripted backends and a client
// that records what it would have sent: no sockets.
#include "gateway/completion_flow.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <catch2/catch.hpp>
#include <optional>
#include <stdexcept>
#include <thread>

using namespace tollgate;
using namespace tollgate::gateway;
using backends::CompletionEvent;
using backends::ErrorKind;
namespace net = boost::asio;

namespace {

CompletionEvent delta(std::string text) {
  CompletionEvent ev;
  ev.type = CompletionEvent::Type::delta;
  ev.text = std::move(text);
  return ev;
}

CompletionEvent done(std::int64_t prompt, std::int64_t completion) {
  CompletionEvent ev;
  ev.type = CompletionEvent::Type::done;
  ev.finish_reason = "stop";
  ev.usage = backends::Usage(prompt, completion);
  return ev;
}

CompletionEvent failure(ErrorKind kind, std::string message = "it failed") {
  CompletionEvent ev;
  ev.type = CompletionEvent::Type::error;
  ev.error = {kind, std::move(message), {}};
  return ev;
}

struct Handle final : backends::CompletionHandle {
  explicit Handle(int& cancels) : cancels_(cancels) {}
  void cancel() override { ++cancels_; }
  int& cancels_;
};

// Answers every request with the same scripted events, delivered before start() returns.
class ScriptedBackend final : public backends::Backend {
 public:
  ScriptedBackend(std::string name, std::vector<CompletionEvent> script) : name_(std::move(name)), script_(script) {}

  const std::string& name() const override { return name_; }
  std::string type() const override { return "scripted"; }
  backends::Capabilities capabilities() const override { return {}; }
  std::int64_t prepare(backends::CompletionRequest& request) const override {
    ++prepares;
    prepare_thread = std::this_thread::get_id();
    auto prepared = std::make_shared<backends::PreparedPrompt>();
    prepared->backend = this;
    prepared->count = 7;
    request.prepared = prepared;
    return 7;
  }
  bool costly_prepare() const override { return costly; }

  std::unique_ptr<backends::CompletionHandle> start(backends::CompletionRequest request,
                                                    std::shared_ptr<backends::CompletionSink> sink) override {
    ++starts;
    upstream_models.push_back(request.upstream_model);
    started_prepared.push_back(request.prepared && request.prepared->backend == this);
    if (throws) throw std::runtime_error("a backend bug");
    for (const auto& ev : script_) sink->on_event(ev);
    return std::make_unique<Handle>(cancels);
  }

  // Embeddings, where `embeds`: the answer as the done event's body.
  std::unique_ptr<backends::CompletionHandle> embed(backends::CompletionRequest request,
                                                    std::shared_ptr<backends::CompletionSink> sink) override {
    if (!embeds) return Backend::embed(std::move(request), std::move(sink));
    ++embeddings;
    auto answer = done(3, 0);
    answer.body = R"({"object":"list","data":[{"embedding":[0.5]}]})";
    sink->on_event(answer);
    return std::make_unique<Handle>(cancels);
  }

  bool embeds = false;
  int embeddings = 0;
  int starts = 0;
  int cancels = 0;
  bool throws = false;
  bool costly = false;
  mutable int prepares = 0;
  mutable std::thread::id prepare_thread;
  std::vector<bool> started_prepared;  // whether start() got a request this backend prepared
  std::vector<std::string> upstream_models;

 private:
  std::string name_;
  std::vector<CompletionEvent> script_;
};

// Records what the flow sends; can play a client that left.
class RecordingClient final : public CompletionClient {
 public:
  net::awaitable<std::optional<std::deque<CompletionEvent>>> next_events(EventQueue& queue, bool watch) override {
    watched = watched || watch;
    if (gone) co_return std::nullopt;
    co_return co_await queue.next();
  }
  net::awaitable<bool> send_event(std::string sse) override {
    if (events_until_gone && events.size() >= *events_until_gone) co_return false;
    events.push_back(std::move(sse));
    co_return true;
  }
  net::awaitable<bool> end_stream() override {
    ended = true;
    co_return true;
  }
  net::awaitable<bool> send_answer(std::string body) override {
    answer = std::move(body);
    co_return true;
  }
  net::awaitable<bool> send_error(const ApiError& e) override {
    error = e;
    co_return true;
  }
  void finish(int s) override {
    CHECK_FALSE(status.has_value());  // exactly once
    status = s;
  }
  void attach(std::shared_ptr<EventQueue>) override { ++attached; }

  bool gone = false;
  std::optional<std::size_t> events_until_gone;
  bool watched = false;
  std::vector<std::string> events;
  bool ended = false;
  std::optional<std::string> answer;
  std::optional<ApiError> error;
  std::optional<int> status;
  int attached = 0;
};

// A router with deployments a, b (and c) of model "m", tried in that order.
struct Fixture {
  explicit Fixture(std::vector<std::vector<CompletionEvent>> scripts, backends::HealthPolicy policy = {})
      : router(policy), metrics(false) {
    backends::Route route{"m", {}, backends::RoutingStrategy::least_busy};
    const char* names[] = {"a", "b", "c"};
    for (std::size_t i = 0; i < scripts.size(); ++i) {
      auto backend = std::make_unique<ScriptedBackend>(names[i], scripts[i]);
      backends.push_back(backend.get());
      router.add_backend(std::move(backend));
      backends::Deployment d;
      d.backend = backends.back();
      d.upstream_model = std::string("upstream-") + names[i];
      route.deployments.push_back(std::move(d));
    }
    router.add_route(std::move(route));
  }

  // Runs one request; returns whether the connection would stay open.
  // As the session does: the first deployment prepares the prompt, then the flow runs.
  bool run(bool stream, RecordingClient& client, backends::Endpoint endpoint = backends::Endpoint::chat_completions) {
    CompletionJob job;
    job.request.endpoint = endpoint;
    job.request.model = "m";
    job.request.stream = stream;
    job.plan = router.plan("m");
    usage = {};
    usage.model = "m";
    CompletionContext ctx{router, metrics, cut_off, std::chrono::steady_clock::now(), usage, backend_time, &pool};
    net::io_context io;
    std::optional<bool> keep;
    net::co_spawn(io, prepare_and_run(ctx, std::move(job), client), [&keep](std::exception_ptr e, bool k) {
      if (e) std::rethrow_exception(e);
      keep = k;
    });
    io_thread = std::this_thread::get_id();
    io.run();
    REQUIRE(keep.has_value());
    return *keep;
  }

  static net::awaitable<bool> prepare_and_run(CompletionContext ctx, CompletionJob job, RecordingClient& client) {
    job.prompt_estimate = co_await prepare_prompt(*job.plan.front()->backend, job.request, ctx.prepare_pool);
    co_return co_await run_completion(ctx, std::move(job), client);
  }

  int failures(std::size_t i) const { return router.routes()[0].deployments[i].health->consecutive_failures.load(); }

  backends::Router router;
  GatewayMetrics metrics;
  std::atomic<bool> cut_off{false};
  metering::UsageEvent usage;
  std::chrono::microseconds backend_time{0};
  std::vector<ScriptedBackend*> backends;
  net::thread_pool pool{1};
  std::thread::id io_thread;
};

}  // namespace

TEST_CASE("a whole answer from the first deployment", "[gateway][flow]") {
  Fixture f({{delta("Hello"), delta(" there"), done(5, 2)}, {done(1, 1)}});
  RecordingClient client;
  CHECK(f.run(false, client));
  REQUIRE(client.answer);
  CHECK(client.answer->find("\"content\":\"Hello there\"") != std::string::npos);
  CHECK(client.status == 200);
  CHECK(client.watched);  // a non-streamed answer watches for a client that leaves
  CHECK(f.backends[0]->upstream_models == std::vector<std::string>{"upstream-a"});
  CHECK(f.backends[1]->starts == 0);
  CHECK(f.usage.backend == "a");
  CHECK(f.usage.prompt_tokens == 5);
  CHECK(f.usage.completion_tokens == 2);
  CHECK_FALSE(f.usage.estimated);
}

TEST_CASE("a streamed answer: deltas, finish, [DONE], the last chunk", "[gateway][flow]") {
  Fixture f({{delta("Hi"), delta("!"), done(3, 2)}});
  RecordingClient client;
  CHECK(f.run(true, client));
  REQUIRE(client.events.size() == 3);
  CHECK(client.events[0].find("\"content\":\"Hi\"") != std::string::npos);
  CHECK(client.events[2].find("\"finish_reason\":\"stop\"") != std::string::npos);
  CHECK(client.events[2].ends_with("data: [DONE]\n\n"));
  CHECK(client.ended);
  CHECK(client.status == 200);
  CHECK_FALSE(client.watched);  // a stream notices a client that left at its next write
  CHECK(f.usage.ttft_us.has_value());
}

TEST_CASE("retryable failures before the first byte fall back to the next deployment", "[gateway][flow]") {
  auto kind = GENERATE(ErrorKind::upstream_failed, ErrorKind::timeout, ErrorKind::rate_limited, ErrorKind::overloaded);
  CAPTURE(static_cast<int>(kind));
  auto stream = GENERATE(false, true);
  Fixture f({{failure(kind)}, {delta("from b"), done(4, 1)}});
  RecordingClient client;
  CHECK(f.run(stream, client));
  CHECK(f.backends[0]->starts == 1);
  CHECK(f.backends[1]->starts == 1);
  CHECK(f.backends[1]->upstream_models == std::vector<std::string>{"upstream-b"});
  CHECK(client.status == 200);
  CHECK_FALSE(client.error);
  CHECK(f.failures(0) == 1);  // counted against a's health
  CHECK(f.failures(1) == 0);
  CHECK(f.usage.backend == "b");
  CHECK(client.attached == 2);
  if (stream) {
    CHECK(client.events.front().find("from b") != std::string::npos);
  } else {
    CHECK(client.answer->find("from b") != std::string::npos);
  }
}

TEST_CASE("a client's error (4xx) is answered as it is, without a fallback", "[gateway][flow]") {
  auto [kind, status] = GENERATE(std::pair{ErrorKind::bad_request, 400}, std::pair{ErrorKind::not_found, 404},
                                 std::pair{ErrorKind::internal, 500});
  Fixture f({{failure(kind, "no such thing")}, {done(1, 1)}});
  RecordingClient client;
  CHECK(f.run(false, client));
  CHECK(f.backends[1]->starts == 0);
  REQUIRE(client.error);
  CHECK(client.error->status == status);
  CHECK(client.error->message == "no such thing");
  CHECK(client.status == status);
  CHECK(f.failures(0) == 0);  // the deployment is not to blame
}

TEST_CASE("a failure after the first streamed byte ends the stream with an error event", "[gateway][flow]") {
  Fixture f({{delta("half"), failure(ErrorKind::upstream_failed, "upstream died")}, {done(1, 1)}});
  RecordingClient client;
  CHECK_FALSE(f.run(true, client));  // the connection closes after a broken stream
  CHECK(f.backends[1]->starts == 0);
  REQUIRE(client.events.size() == 2);
  CHECK(client.events[1].find("upstream died") != std::string::npos);
  CHECK(client.events[1].find("\"error\"") != std::string::npos);
  CHECK(client.ended);
  CHECK(client.status == 502);
  CHECK(f.failures(0) == 1);
  // What reached the client is metered, as an estimate.
  CHECK(f.usage.completion_tokens == 1);
  CHECK(f.usage.prompt_tokens == 7);
  CHECK(f.usage.estimated);
}

TEST_CASE("a failure after deltas of a whole answer is not retried either", "[gateway][flow]") {
  Fixture f({{delta("half"), failure(ErrorKind::timeout)}, {done(1, 1)}});
  RecordingClient client;
  CHECK(f.run(false, client));
  CHECK(f.backends[1]->starts == 0);
  REQUIRE(client.error);
  CHECK(client.error->status == 504);
}

TEST_CASE("when the last deployment fails too, its error reaches the client", "[gateway][flow]") {
  Fixture f({{failure(ErrorKind::upstream_failed, "a down")}, {failure(ErrorKind::rate_limited, "b busy")}});
  RecordingClient client;
  CHECK(f.run(true, client));
  REQUIRE(client.error);
  CHECK(client.error->status == 429);
  CHECK(client.error->message == "b busy");
  CHECK(client.events.empty());
  CHECK(client.status == 429);
  CHECK(f.failures(0) == 1);
  CHECK(f.failures(1) == 1);
}

TEST_CASE("no fallback once the shutdown grace has run out", "[gateway][flow]") {
  Fixture f({{failure(ErrorKind::overloaded, "the gateway is shutting down")}, {done(1, 1)}});
  f.cut_off = true;
  RecordingClient client;
  f.run(false, client);
  CHECK(f.backends[1]->starts == 0);
  REQUIRE(client.error);
  CHECK(client.error->status == 503);
}

TEST_CASE("consecutive failures cool a deployment down: it is tried last until it recovers", "[gateway][flow]") {
  Fixture f({{failure(ErrorKind::upstream_failed)}, {done(1, 1)}}, {2, std::chrono::minutes(1)});
  for (int i = 0; i < 2; ++i) {
    RecordingClient client;
    f.run(false, client);
    CHECK(client.status == 200);
  }
  CHECK(f.backends[0]->starts == 2);
  // Cooling: b goes first now, and a is not started while b answers.
  auto plan = f.router.plan("m");
  REQUIRE(plan.size() == 2);
  CHECK(plan[0]->backend->name() == "b");
  CHECK(plan[1]->backend->name() == "a");
  RecordingClient client;
  f.run(false, client);
  CHECK(f.backends[0]->starts == 2);
  CHECK(f.backends[1]->starts == 3);
}

TEST_CASE("a success resets a deployment's failure count", "[gateway][flow]") {
  Fixture f({{failure(ErrorKind::timeout)}, {done(1, 1)}}, {3, std::chrono::minutes(1)});
  RecordingClient first;
  f.run(false, first);
  CHECK(f.failures(0) == 1);
  f.router.record_success(f.router.routes()[0].deployments[0]);
  CHECK(f.failures(0) == 0);
}

TEST_CASE("a client that leaves cancels the call and is metered 499", "[gateway][flow]") {
  SECTION("while a whole answer is produced") {
    Fixture f({{delta("x"), done(1, 1)}});
    RecordingClient client;
    client.gone = true;
    CHECK_FALSE(f.run(false, client));
    CHECK(f.backends[0]->cancels == 1);
    CHECK(client.status == 499);
    CHECK_FALSE(client.answer);
  }
  SECTION("mid-stream") {
    Fixture f({{delta("one"), delta("two"), done(1, 2)}});
    RecordingClient client;
    client.events_until_gone = 1;
    CHECK_FALSE(f.run(true, client));
    CHECK(f.backends[0]->cancels == 1);
    CHECK(client.status == 499);
    CHECK(f.usage.completion_tokens == 2);  // produced, and the second was on its way
  }
}

TEST_CASE("a backend that throws on start is a 500, metered, without a fallback", "[gateway][flow]") {
  Fixture f({{done(1, 1)}, {done(1, 1)}});
  f.backends[0]->throws = true;
  RecordingClient client;
  CHECK(f.run(false, client));
  REQUIRE(client.error);
  CHECK(client.error->status == 500);
  CHECK(client.status == 500);
  CHECK(f.backends[1]->starts == 0);
}

TEST_CASE("a prompt is prepared once, off the io thread when that is costly", "[gateway][flow]") {
  SECTION("a costly backend prepares on the pool, and start() gets its work") {
    Fixture f({{done(7, 1)}});
    f.backends[0]->costly = true;
    RecordingClient client;
    f.run(false, client);
    CHECK(f.backends[0]->prepares == 1);
    CHECK(f.backends[0]->prepare_thread != f.io_thread);
    CHECK(f.backends[0]->started_prepared == std::vector<bool>{true});
  }
  SECTION("a cheap one prepares in place") {
    Fixture f({{done(7, 1)}});
    RecordingClient client;
    f.run(false, client);
    CHECK(f.backends[0]->prepares == 1);
    CHECK(f.backends[0]->prepare_thread == f.io_thread);
  }
  SECTION("a fallback to a costly backend prepares for it, once") {
    Fixture f({{failure(ErrorKind::upstream_failed)}, {done(7, 1)}});
    f.backends[1]->costly = true;
    RecordingClient client;
    f.run(false, client);
    CHECK(client.status == 200);
    CHECK(f.backends[0]->prepares == 1);
    CHECK(f.backends[1]->prepares == 1);
    CHECK(f.backends[1]->prepare_thread != f.io_thread);
    CHECK(f.backends[1]->started_prepared == std::vector<bool>{true});
  }
}

TEST_CASE("embeddings are the backend's own call, answered with its body as it is", "[gateway][flow]") {
  Fixture f({{done(1, 1)}, {done(1, 1)}});
  f.backends[1]->embeds = true;
  RecordingClient client;
  CHECK(f.run(false, client, backends::Endpoint::embeddings));
  // The first cannot embed: refused as a client error, so no fallback.
  REQUIRE(client.error);
  CHECK(client.error->status == 400);
  CHECK(f.backends[0]->starts == 0);

  Fixture g({{done(1, 1)}});
  g.backends[0]->embeds = true;
  RecordingClient other;
  CHECK(g.run(false, other, backends::Endpoint::embeddings));
  CHECK(g.backends[0]->embeddings == 1);
  CHECK(g.backends[0]->starts == 0);
  REQUIRE(other.answer);
  CHECK(*other.answer == R"({"object":"list","data":[{"embedding":[0.5]}]})");
  CHECK(other.status == 200);
  CHECK(g.usage.prompt_tokens == 3);
}
