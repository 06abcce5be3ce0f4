#include "backends/runpod.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <atomic>
#include <boost/json.hpp>
#include <stdexcept>
#include <thread>

#include "backends/config_reader.hpp"
#include "backends/http_client.hpp"
#include "backends/openai_compatible.hpp"

namespace tollgate::backends {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using SteadyClock = std::chrono::steady_clock;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

// An upstream error body is read for its message up to this size.
constexpr std::size_t kMaxErrorBody = 64 * 1024;
// A best-effort cancel of an abandoned job waits at most this long.
constexpr std::chrono::milliseconds kCancelTimeout{5'000};
// Events the client has not taken yet past which polling the stream pauses.
constexpr std::size_t kMaxPendingEvents = 64;

const std::string kTotalTimeout = "the upstream call exceeded the total timeout";

enum class JobStatus { in_queue, in_progress, completed, failed, cancelled, timed_out, unknown };

JobStatus job_status(std::string_view s) {
  if (s == "IN_QUEUE") return JobStatus::in_queue;
  if (s == "IN_PROGRESS") return JobStatus::in_progress;
  if (s == "COMPLETED") return JobStatus::completed;
  if (s == "FAILED") return JobStatus::failed;
  if (s == "CANCELLED") return JobStatus::cancelled;
  if (s == "TIMED_OUT") return JobStatus::timed_out;
  return JobStatus::unknown;
}

bool pending(JobStatus s) { return s == JobStatus::in_queue || s == JobStatus::in_progress; }

SteadyClock::time_point earliest(SteadyClock::time_point a, SteadyClock::time_point b) { return a < b ? a : b; }

std::int64_t as_count(const json::value* v) {
  if (v && v->is_int64() && v->get_int64() >= 0) return v->get_int64();
  if (v && v->is_uint64()) return static_cast<std::int64_t>(std::min<std::uint64_t>(v->get_uint64(), INT64_MAX));
  return 0;
}

// OpenAI's and Tollgate's usage: {prompt_tokens, completion_tokens}.
std::optional<Usage> openai_usage(const json::value* v) {
  const auto* o = v ? v->if_object() : nullptr;
  if (!o || (!o->contains("prompt_tokens") && !o->contains("completion_tokens"))) return std::nullopt;
  return Usage(as_count(o->if_contains("prompt_tokens")), as_count(o->if_contains("completion_tokens")));
}

// worker-vllm's usage: {input, output}.
std::optional<Usage> vllm_usage(const json::value* v) {
  const auto* o = v ? v->if_object() : nullptr;
  if (!o || (!o->contains("input") && !o->contains("output"))) return std::nullopt;
  return Usage(as_count(o->if_contains("input")), as_count(o->if_contains("output")));
}

const json::object* first_choice(const json::object& o) {
  const auto* choices = o.if_contains("choices");
  if (!choices || !choices->is_array() || choices->get_array().empty()) return nullptr;
  return choices->get_array()[0].if_object();
}

// A worker-vllm output item: {"choices": [{"tokens": [...]}], ...}.
bool vllm_item(const json::value& v) {
  const auto* o = v.if_object();
  const auto* choice = o ? first_choice(*o) : nullptr;
  return choice && choice->contains("tokens") && choice->at("tokens").is_array();
}

const char* json_kind(const json::value& v) {
  switch (v.kind()) {
    case json::kind::object:
      return "an object";
    case json::kind::array:
      return "an array";
    case json::kind::string:
      return "a string";
    case json::kind::null:
      return "null";
    case json::kind::bool_:
      return "a boolean";
    default:
      return "a number";
  }
}

bool read_finish_reason(const json::object& o, RunpodOutput& out) {
  const auto* fr = o.if_contains("finish_reason");
  if (!fr || fr->is_null()) return true;
  if (!fr->is_string()) return false;
  out.finish_reason = std::string(fr->get_string());
  return true;
}

}  // namespace

bool valid_runpod_id(std::string_view id) {
  if (id.empty() || id.size() > kMaxRunpodId) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
}

std::optional<RunpodOutput> read_runpod_output(const json::value& output, std::string& error) {
  RunpodOutput out;
  const auto* o = output.if_object();
  // 1. Tollgate's own job output.
  if (o && !o->contains("choices") && (o->contains("text") || o->contains("finish_reason"))) {
    const auto* text = o->if_contains("text");
    if ((text && !text->is_string() && !text->is_null()) || !read_finish_reason(*o, out)) {
      error = "the upstream's output has a 'text' or 'finish_reason' that is not a string";
      return std::nullopt;
    }
    if (text && text->is_string()) out.text = std::string(text->get_string());
    out.usage = openai_usage(o->if_contains("usage"));
    return out;
  }
  // 2. worker-vllm: a list of items (or one), each with its choice's tokens.
  if (output.is_array() || vllm_item(output)) {
    const json::array single{output};
    const auto& items = output.is_array() ? output.get_array() : single;
    for (const auto& item : items) {
      if (!vllm_item(item)) {
        error = "the upstream's output list holds an item without choices[0].tokens";
        return std::nullopt;
      }
      const auto& choice = *first_choice(item.get_object());
      for (const auto& token : choice.at("tokens").get_array()) {
        if (!token.is_string()) {
          error = "the upstream's output has a token that is not a string";
          return std::nullopt;
        }
        out.text.append(token.get_string());
        ++out.tokens;
      }
      if (!read_finish_reason(choice, out)) {
        error = "the upstream's output has a 'finish_reason' that is not a string";
        return std::nullopt;
      }
      if (auto u = vllm_usage(item.get_object().if_contains("usage"))) out.usage = u;
    }
    return out;
  }
  // 3. OpenAI's shape: a completion, a chat completion or a chunk of one.
  if (o && o->contains("choices")) {
    const auto* choice = first_choice(*o);
    const json::value* text = nullptr;
    bool known = false;
    if (choice) {
      if ((text = choice->if_contains("text"))) {
        known = true;
      } else {
        for (const char* key : {"message", "delta"}) {
          const auto* m = choice->if_contains(key);
          if (m && m->is_object()) {
            known = true;
            text = m->get_object().if_contains("content");
            break;
          }
        }
      }
    }
    if (!known || (text && !text->is_string() && !text->is_null()) || !read_finish_reason(*choice, out)) {
      error = "the upstream's output has choices without a text, a message or a delta";
      return std::nullopt;
    }
    if (text && text->is_string()) out.text = std::string(text->get_string());
    out.usage = openai_usage(o->if_contains("usage"));
    return out;
  }
  // 4. The text alone.
  if (output.is_string()) {
    out.text = std::string(output.get_string());
    return out;
  }
  error = std::string("the upstream's output has none of the known shapes (it is ") + json_kind(output) + ")";
  return std::nullopt;
}

std::string runpod_job_body(const CompletionRequest& request) {
  json::object input;
  input["model"] = request.upstream_model.empty() ? request.model : request.upstream_model;
  if (request.chat()) {
    json::array messages;
    for (const auto& m : request.messages) messages.push_back(json::object{{"role", m.role}, {"content", m.content}});
    input["messages"] = std::move(messages);
  } else {
    input["prompt"] = request.prompt;
  }
  // Only what the client set: the worker's defaults are the model's.
  json::object sampling;
  if (request.max_tokens) sampling["max_tokens"] = *request.max_tokens;
  if (request.temperature != 1.0) sampling["temperature"] = request.temperature;
  if (request.top_p != 1.0) sampling["top_p"] = request.top_p;
  if (request.top_k != 0) sampling["top_k"] = request.top_k;
  if (request.seed) sampling["seed"] = *request.seed;
  if (!request.stop.empty()) {
    json::array stop;
    for (const auto& s : request.stop) stop.push_back(json::string(s));
    sampling["stop"] = std::move(stop);
  }
  if (request.presence_penalty != 0.0) sampling["presence_penalty"] = request.presence_penalty;
  if (request.frequency_penalty != 0.0) sampling["frequency_penalty"] = request.frequency_penalty;
  if (!sampling.empty()) input["sampling_params"] = std::move(sampling);
  input["stream"] = request.stream;
  return json::serialize(json::object{{"input", std::move(input)}});
}

namespace {

// One call's state, shared by its coroutine (on the backend's thread) and its handle.
struct Call {
  std::shared_ptr<CompletionSink> sink;
  const SecretScrubber* scrub = nullptr;  // the backend's, which outlives its calls
  std::atomic<bool> cancelled{false};
  std::weak_ptr<net::io_context> ioc;    // the backend's: other threads reach the call through it
  UpstreamConnection* active = nullptr;  // backend thread only
  // Backend thread only: set while the call waits (a poll interval, a pool
  // connection, the client); cancelling it makes the call look again.
  net::steady_timer* waiting = nullptr;
  std::int64_t prompt_estimate = 0;
  std::size_t produced_bytes = 0;
  std::int64_t produced_pieces = 0;  // tokens where the worker lists them, else pieces of text
  std::optional<Usage> reported;
  bool answered = false;  // the upstream took the job: the prompt was consumed
  std::string finish_reason;

  void emit(CompletionEvent event) {
    if (!cancelled && sink) sink->on_event(std::move(event));
  }

  // The upstream's count; where it gives none (or no completion tokens for a
  // text), an estimate as the openai backend makes one.
  Usage usage() const {
    if (reported && (reported->completion_tokens > 0 || produced_bytes == 0)) return *reported;
    if (!answered) return {};
    std::int64_t completion = 0;
    if (produced_bytes > 0) {
      completion = std::max<std::int64_t>({1, produced_pieces, static_cast<std::int64_t>(produced_bytes / 4)});
    }
    return {reported ? reported->prompt_tokens : prompt_estimate, completion, true};
  }

  // A whole output or a piece of a streamed one: its text goes out as a delta.
  void take(RunpodOutput piece) {
    if (piece.usage) reported = piece.usage;
    if (!piece.finish_reason.empty()) finish_reason = std::move(piece.finish_reason);
    if (piece.text.empty()) return;
    produced_bytes += piece.text.size();
    produced_pieces += piece.tokens > 0 ? piece.tokens : 1;
    CompletionEvent delta;
    delta.text = std::move(piece.text);
    emit(std::move(delta));
  }

  void done() {
    CompletionEvent event;
    event.type = CompletionEvent::Type::done;
    event.finish_reason = finish_reason == "length" ? "length" : "stop";
    event.usage = usage();
    emit(std::move(event));
    sink.reset();  // nothing may follow the final event
  }

  void fail(ErrorKind kind, std::string message, std::optional<std::int64_t> retry_after = std::nullopt) {
    fail(BackendError{kind, std::move(message), retry_after});
  }
  void fail(BackendError error) {
    CompletionEvent event;
    event.type = CompletionEvent::Type::error;
    // Every error message passes here: no credential of ours reaches the client.
    if (scrub) {
      error.message = (*scrub)(std::move(error.message));
      if (!error.code.empty()) error.code = (*scrub)(std::move(error.code));
      if (error.param) error.param = (*scrub)(std::move(*error.param));
    }
    event.error = std::move(error);
    event.usage = usage();
    emit(std::move(event));
    sink.reset();
  }
};

class CallHandle final : public CompletionHandle {
 public:
  explicit CallHandle(std::shared_ptr<Call> call) : call_(std::move(call)) {}

  void cancel() override {
    call_->cancelled = true;
    auto ioc = call_->ioc.lock();
    if (!ioc) return;
    // The call wakes, sees the cancel and cancels its job upstream.
    auto wake = [call = call_] {
      if (call->active) call->active->close();
      if (call->waiting) call->waiting->cancel();
    };
    net::post(*ioc, std::move(wake));
  }

 private:
  std::shared_ptr<Call> call_;
};

// What a call needs from its backend.
struct Upstream {
  RunpodConfig config;
  SecretScrubber scrub;
  HttpClient* client = nullptr;
  std::string job_path;  // base path + "/" + endpoint
};

struct Reply {
  int status = 0;
  std::string body;
  std::string retry_after;
};

bool is_stale_connection_error(const boost::system::error_code& ec) {
  return ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset ||
         ec == net::error::broken_pipe;
}

// Reads the rest of a body into the parser, up to `cap` bytes.
net::awaitable<boost::system::error_code> read_rest(UpstreamConnection& conn, UpstreamConnection::Parser& parser,
                                                    std::size_t cap) {
  while (!parser.is_done()) {
    if (parser.get().body().size() > cap) co_return http::error::body_limit;
    auto [ec, n] = co_await conn.read_some(parser);
    if (ec) co_return ec;
  }
  co_return boost::system::error_code{};
}

// g++ 12 sees Asio's frame allocator (aligned_alloc, freed by the frame's own
// operator delete) through enough inlining here to call it a mismatch: a
// known false positive for coroutine frames, silenced for this function only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
// One request to the upstream and its whole answer (a 2xx body up to
// kMaxCompletionBody, another up to kMaxErrorBody), by `deadline`. std::nullopt
// with `error` set when it failed, or with `error.message` empty when
// `cancelled` was set. `tracked`, when given, lets a cancel reach the call.
net::awaitable<std::optional<Reply>> exchange(Upstream& up, Call* tracked, const std::atomic<bool>& cancelled,
                                              http::verb verb, std::string target, std::string body,
                                              SteadyClock::time_point deadline, BackendError& error) {
  const auto& origin = up.client->origin();
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, origin.host_header());
  req.set(http::field::user_agent, "tollgate");
  req.set(http::field::accept, "application/json");
  if (verb == http::verb::post) req.set(http::field::content_type, "application/json");
  if (!up.config.api_key.empty()) req.set(http::field::authorization, "Bearer " + up.config.api_key);
  req.keep_alive(true);
  req.body() = std::move(body);
  req.prepare_payload();

  net::steady_timer wait(co_await net::this_coro::executor);
  std::unique_ptr<UpstreamConnection> conn;
  std::optional<UpstreamConnection::Parser> parser;
  // However this ends, a later cancel() must not reach the connection or the
  // timer (both die here): forgotten before they are destroyed.
  struct Forget {
    Call* call;
    ~Forget() {
      if (!call) return;
      call->active = nullptr;
      call->waiting = nullptr;
    }
  } forget{tracked};
  for (int attempt = 0;; ++attempt) {
    ConnectFailure failure;
    if (tracked) tracked->waiting = &wait;
    conn = co_await up.client->acquire(earliest(deadline, SteadyClock::now() + up.config.connect_timeout), cancelled,
                                       wait, failure);
    if (tracked) tracked->waiting = nullptr;
    if (!conn) {
      if (failure.timeout) {
        error = {ErrorKind::timeout, SteadyClock::now() >= deadline ? kTotalTimeout : failure.message, {}};
      } else if (!failure.cancelled) {
        error = {ErrorKind::upstream_failed, failure.message, {}};
      }
      co_return std::nullopt;
    }
    if (tracked) tracked->active = conn.get();
    conn->expires_at(deadline);
    parser.emplace();
    parser->body_limit(boost::none);  // read_rest caps bodies itself
    auto [write_ec, written] = co_await conn->write(req);
    boost::system::error_code ec = write_ec;
    if (!ec) {
      auto [read_ec, read] = co_await conn->read_header(*parser);
      ec = read_ec;
    }
    if (!ec) break;
    if (tracked) tracked->active = nullptr;
    if (cancelled) co_return std::nullopt;
    // A pooled connection the server closed while idle fails before any byte
    // of the answer: the request never reached it, so one retry is safe.
    bool stale = conn->reused && attempt == 0 && is_stale_connection_error(ec);
    conn.reset();
    if (stale) continue;
    error = ec == beast::error::timeout
                ? BackendError{ErrorKind::timeout, kTotalTimeout, {}}
                : BackendError{ErrorKind::upstream_failed, "the upstream connection failed: " + ec.message(), {}};
    co_return std::nullopt;
  }

  Reply reply;
  reply.status = parser->get().result_int();
  bool ok = reply.status >= 200 && reply.status <= 299;
  std::size_t cap = ok ? kMaxCompletionBody : kMaxErrorBody;
  auto ec = co_await read_rest(*conn, *parser, cap);
  if (tracked) tracked->active = nullptr;
  if (cancelled) co_return std::nullopt;
  if (ok && ec) {
    if (ec == beast::error::timeout) {
      error = {ErrorKind::timeout, kTotalTimeout, {}};
    } else if (ec == http::error::body_limit) {
      error = {ErrorKind::upstream_failed,
               "the upstream's answer is larger than " + std::to_string(cap / (1024 * 1024)) +
                   " MiB; the call was abandoned",
               {}};
    } else {
      error = {ErrorKind::upstream_failed, "the upstream connection failed: " + ec.message(), {}};
    }
    co_return std::nullopt;  // the connection closes with `conn`
  }
  // A non-2xx answer cut short still says what went wrong.
  reply.retry_after = std::string(parser->get()[http::field::retry_after]);
  reply.body = std::move(parser->get().body());
  if (!ec && parser->keep_alive()) up.client->release(std::move(conn));
  co_return reply;
}
#pragma GCC diagnostic pop

// Asks the upstream to stop a job this call abandons; its answer does not matter.
// The cancel has its own budget: a call that ran out of its total timeout
// still gets its job stopped (the client has its answer already).
net::awaitable<void> cancel_job(Upstream& up, const std::string& id) {
  const std::atomic<bool> never{false};
  BackendError ignored;
  auto deadline = SteadyClock::now() + up.config.connect_timeout + kCancelTimeout;
  co_await exchange(up, nullptr, never, http::verb::post, up.job_path + "/cancel/" + id, "", deadline, ignored);
}

enum class Waited { elapsed, cancelled, deadline };

// Waits `interval`, or less when the deadline or a cancel comes first.
net::awaitable<Waited> pause(Call& call, std::chrono::milliseconds interval, SteadyClock::time_point deadline) {
  if (call.cancelled) co_return Waited::cancelled;
  net::steady_timer timer(co_await net::this_coro::executor);
  bool cut = SteadyClock::now() + interval >= deadline;
  timer.expires_at(earliest(deadline, SteadyClock::now() + interval));
  call.waiting = &timer;
  co_await timer.async_wait(as_tuple);
  call.waiting = nullptr;
  if (call.cancelled) co_return Waited::cancelled;
  co_return cut ? Waited::deadline : Waited::elapsed;
}

// Resumes a stream poll paused for the client, from any thread.
void resume_poll(const std::weak_ptr<Call>& weak_call, const std::weak_ptr<net::io_context>& weak_ioc) {
  auto ioc = weak_ioc.lock();
  if (!ioc) return;
  net::post(*ioc, [weak_call] {
    auto call = weak_call.lock();
    if (call && call->waiting) call->waiting->cancel();
  });
}

// The upstream's answer about a job: {id, status, output | stream, error}.
struct JobAnswer {
  json::object body;
  JobStatus status = JobStatus::unknown;
  std::string id;  // empty when the answer names none
};

std::optional<JobAnswer> read_job_answer(const std::string& body, std::string& error) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  if (ec || !v.is_object()) {
    error = "the upstream sent a malformed job answer (not a JSON object)";
    return std::nullopt;
  }
  JobAnswer answer;
  answer.body = std::move(v.get_object());
  const auto* status = answer.body.if_contains("status");
  if (!status || !status->is_string()) {
    error = "the upstream's job answer has no status";
    return std::nullopt;
  }
  answer.status = job_status(status->get_string());
  if (answer.status == JobStatus::unknown) {
    error = "the upstream's job has an unknown status";
    return std::nullopt;
  }
  if (const auto* id = answer.body.if_contains("id"); id && id->is_string()) answer.id = std::string(id->get_string());
  return answer;
}

// The error a job that ended without completing is reported as.
BackendError job_error(const JobAnswer& answer, const SecretScrubber& scrub) {
  if (answer.status == JobStatus::timed_out) return {ErrorKind::timeout, "the upstream job timed out", {}};
  if (answer.status == JobStatus::cancelled) {
    return {ErrorKind::upstream_failed, "the upstream cancelled the job", {}};
  }
  std::string reason = "no reason given";
  if (const auto* e = answer.body.if_contains("error"); e && !e->is_null()) {
    reason = quote_upstream(e->is_string() ? std::string(e->get_string()) : json::serialize(*e), scrub);
  }
  return {ErrorKind::upstream_failed, "the upstream job failed: " + reason, {}};
}

// Reads a whole output into the call; false (the call failed) when it has no known shape.
bool take_output(Call& call, const json::value& output) {
  std::string error;
  auto piece = read_runpod_output(output, error);
  if (!piece) {
    call.fail(ErrorKind::upstream_failed, std::move(error));
    return false;
  }
  call.take(std::move(*piece));
  return true;
}

// A /stream answer's pieces into the call; their count, or -1 (the call failed).
int take_stream(Call& call, const JobAnswer& answer) {
  const auto* stream = answer.body.if_contains("stream");
  if (!stream || stream->is_null()) return 0;
  if (!stream->is_array()) {
    call.fail(ErrorKind::upstream_failed, "the upstream's stream answer has a 'stream' that is not a list");
    return -1;
  }
  int pieces = 0;
  for (const auto& piece : stream->get_array()) {
    const auto* o = piece.if_object();
    const auto* output = o ? o->if_contains("output") : nullptr;
    if (!output) {
      call.fail(ErrorKind::upstream_failed, "the upstream's stream holds a piece without an output");
      return -1;
    }
    if (!take_output(call, *output)) return -1;
    ++pieces;
  }
  return pieces;
}

net::awaitable<void> run_job(Upstream* up, std::shared_ptr<Call> call, CompletionRequest request) {
  const auto& cfg = up->config;
  auto deadline = SteadyClock::now() + cfg.total_timeout;
  BackendError error;
  auto reply = co_await exchange(*up, call.get(), call->cancelled, http::verb::post,
                                 up->job_path + (request.stream ? "/run" : "/runsync"), runpod_job_body(request),
                                 deadline, error);
  std::string job_id;
  // The job is abandoned (a cancel, a timeout, a broken answer): the upstream
  // stops it, so it costs nothing more. Its id was checked before it is used.
  auto abandon = [&]() -> net::awaitable<void> {
    if (!job_id.empty()) co_await cancel_job(*up, job_id);
  };
  bool streamed_any = false;
  for (;;) {  // bounded by the total deadline
    if (!reply) {
      if (!error.message.empty()) call->fail(std::move(error));
      co_await abandon();
      co_return;
    }
    if (reply->status < 200 || reply->status > 299) {
      call->fail(upstream_status_error(reply->status, reply->body, reply->retry_after, up->scrub));
      co_await abandon();
      co_return;
    }
    call->answered = true;
    std::string message;
    auto answer = read_job_answer(reply->body, message);
    if (!answer) {
      call->fail(ErrorKind::upstream_failed, std::move(message));
      co_await abandon();
      co_return;
    }
    if (job_id.empty() && !answer->id.empty()) {
      if (!valid_runpod_id(answer->id)) {
        call->fail(ErrorKind::upstream_failed, "the upstream named its job with an invalid id");
        co_return;
      }
      job_id = answer->id;
    }
    int pieces = 0;
    if (request.stream) {
      pieces = take_stream(*call, *answer);
      if (pieces < 0) {
        co_await abandon();
        co_return;
      }
      streamed_any = streamed_any || pieces > 0;
    }
    if (answer->status == JobStatus::completed) {
      // A worker that does not stream leaves its whole output on the last answer.
      if (!request.stream || !streamed_any) {
        const auto* output = answer->body.if_contains("output");
        if (!request.stream && (!output || output->is_null())) {
          call->fail(ErrorKind::upstream_failed, "the upstream's job completed without an output");
          co_return;
        }
        if (output && !output->is_null() && !take_output(*call, *output)) co_return;
      }
      call->done();
      co_return;
    }
    if (!pending(answer->status)) {
      call->fail(job_error(*answer, up->scrub));
      co_return;
    }
    if (job_id.empty()) {
      call->fail(ErrorKind::upstream_failed, "the upstream's unfinished job has no id");
      co_return;
    }
    // Nothing new: wait before asking again.
    if (pieces == 0) {
      auto waited = co_await pause(*call, cfg.poll_interval, deadline);
      if (waited == Waited::deadline) call->fail(ErrorKind::timeout, kTotalTimeout);
      if (waited != Waited::elapsed) {
        co_await abandon();
        co_return;
      }
    }
    // Backpressure: while the client has not taken what was sent, the job's
    // stream is not polled, so a slow client cannot make the gateway buffer.
    auto resume = [weak_call = std::weak_ptr<Call>(call), weak_ioc = call->ioc] { resume_poll(weak_call, weak_ioc); };
    while (!call->cancelled && call->sink && call->sink->when_drained(kMaxPendingEvents, resume)) {
      net::steady_timer wait(co_await net::this_coro::executor);
      wait.expires_at(deadline);
      call->waiting = &wait;
      auto [ec] = co_await wait.async_wait(as_tuple);
      call->waiting = nullptr;
      // A wake-up cancels the wait: only the total deadline lets it expire.
      if (!ec) call->fail(ErrorKind::timeout, kTotalTimeout);
      if (!ec || call->cancelled) break;
    }
    if (call->cancelled || !call->sink) {
      co_await abandon();
      co_return;
    }
    error = {};
    reply = co_await exchange(*up, call.get(), call->cancelled, http::verb::get,
                              up->job_path + (request.stream ? "/stream/" : "/status/") + job_id, "", deadline, error);
  }
}

net::awaitable<void> run_call(Upstream* up, std::shared_ptr<Call> call, CompletionRequest request) {
  try {
    co_await run_job(up, call, std::move(request));
  } catch (const std::exception& e) {
    call->active = nullptr;
    call->waiting = nullptr;
    call->fail(ErrorKind::internal, std::string("the upstream call failed: ") + e.what());
  }
}

class RunpodBackend final : public Backend {
 public:
  RunpodBackend(const RunpodConfig& config, UpstreamOrigin origin)
      : ioc_(std::make_shared<net::io_context>(1)), work_(net::make_work_guard(*ioc_)) {
    up_.config = config;
    up_.scrub = SecretScrubber(config.api_key, {});
    up_.job_path = origin.base_path + "/" + config.endpoint;
    HttpClientOptions options;
    options.connect_timeout = config.connect_timeout;
    options.max_connections = config.max_connections;
    try {
      client_ = std::make_unique<HttpClient>(*ioc_, std::move(origin), options);
    } catch (const boost::system::system_error& e) {
      throw std::invalid_argument("backend '" + config.name + "': cannot load the TLS trust store: " + e.what());
    }
    up_.client = client_.get();
    thread_ = std::thread([this] { ioc_->run(); });
  }

  ~RunpodBackend() override {
    work_.reset();
    ioc_->stop();
    thread_.join();
    // Unfinished calls die with the context and close their connections; the
    // client must outlive them, but not own sockets past the context.
    client_->shutdown();
    ioc_.reset();
    client_.reset();
  }

  const std::string& name() const override { return up_.config.name; }
  std::string type() const override { return "runpod"; }
  Capabilities capabilities() const override { return {}; }  // chat, completions, streaming; no embeddings

  std::int64_t prepare(CompletionRequest& request) const override {
    auto prepared = std::make_shared<PreparedPrompt>();
    prepared->backend = this;
    prepared->count = estimate_prompt_tokens(request);
    request.prepared = prepared;
    return prepared->count;
  }

  std::unique_ptr<CompletionHandle> start(CompletionRequest request, std::shared_ptr<CompletionSink> sink) override {
    auto call = std::make_shared<Call>();
    call->scrub = &up_.scrub;
    call->ioc = ioc_;
    if (request.non_text_content) {
      call->sink = std::move(sink);
      call->fail(ErrorKind::bad_request,
                 "the model '" + request.model + "' takes text only; its messages have other content parts");
      return std::make_unique<CallHandle>(std::move(call));
    }
    call->sink = std::move(sink);
    call->prompt_estimate = request.prepared && request.prepared->backend == this ? request.prepared->count
                                                                                  : estimate_prompt_tokens(request);
    net::co_spawn(*ioc_, run_call(&up_, call, std::move(request)), net::detached);
    return std::make_unique<CallHandle>(std::move(call));
  }

 private:
  Upstream up_;
  std::shared_ptr<net::io_context> ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::unique_ptr<HttpClient> client_;
  std::thread thread_;
};

std::unique_ptr<Backend> make_runpod(const RunpodConfig& config, const BackendContext&) {
  try {
    return make_runpod_backend(config);
  } catch (const std::invalid_argument& e) {
    throw ConfigError(e.what());
  }
}

std::shared_ptr<const BackendSpec> parse_runpod(const ConfigReader& r, const YAML::Node& node, const std::string& path,
                                                const std::string& name) {
  r.expect_map(node, path,
               {"name", "type", "base_url", "endpoint", "api_key", "timeouts", "poll_interval_ms", "max_connections"});
  RunpodConfig c;
  c.name = name;
  if (auto n = node["base_url"]) {
    c.base_url = r.string(n, child_path(path, "base_url"));
    if (!c.base_url.starts_with("http://") && !c.base_url.starts_with("https://")) {
      r.fail(child_path(path, "base_url"), "must start with http:// or https://");
    }
  }
  if (!node["endpoint"]) r.fail(path, "missing key 'endpoint' (the serverless endpoint's id)");
  c.endpoint = r.string(node["endpoint"], child_path(path, "endpoint"));
  if (!valid_runpod_id(c.endpoint)) {
    r.fail(child_path(path, "endpoint"),
           "must be 1 to " + std::to_string(kMaxRunpodId) + " letters, digits, '_' or '-'");
  }
  if (auto n = node["api_key"]) c.api_key = r.scalar(n, child_path(path, "api_key"));
  if (auto n = node["timeouts"]) {
    auto tpath = child_path(path, "timeouts");
    r.expect_map(n, tpath, {"connect", "total"});
    std::pair<const char*, std::chrono::milliseconds*> timeouts[] = {{"connect", &c.connect_timeout},
                                                                     {"total", &c.total_timeout}};
    for (auto [key, target] : timeouts) {
      if (!n[key]) continue;
      *target = r.duration(n[key], child_path(tpath, key));
      if (target->count() <= 0) r.fail(child_path(tpath, key), "must be positive");
    }
  }
  if (auto n = node["poll_interval_ms"]) {
    c.poll_interval = std::chrono::milliseconds(
        r.integer(n, child_path(path, "poll_interval_ms"), kMinRunpodPollMs, kMaxRunpodPollMs));
  }
  if (auto n = node["max_connections"]) {
    c.max_connections = static_cast<std::size_t>(r.integer(n, child_path(path, "max_connections"), 1, 100'000));
  }
  return std::make_shared<BackendSpecOf<RunpodConfig>>(std::move(c), make_runpod);
}

}  // namespace

std::unique_ptr<Backend> make_runpod_backend(const RunpodConfig& config) {
  if (!valid_runpod_id(config.endpoint)) {
    throw std::invalid_argument("backend '" + config.name + "': endpoint must be 1 to " + std::to_string(kMaxRunpodId) +
                                " letters, digits, '_' or '-'");
  }
  std::string error;
  auto origin = parse_base_url(config.base_url, error);
  if (!origin) throw std::invalid_argument("backend '" + config.name + "': base_url " + error);
  return std::make_unique<RunpodBackend>(config, std::move(*origin));
}

BackendType runpod_backend_type() { return {"runpod", parse_runpod}; }

}  // namespace tollgate::backends
