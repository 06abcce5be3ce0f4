#include "backends/openai_compatible.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <boost/json.hpp>
#include <cctype>
#include <iostream>
#include <stdexcept>
#include <thread>

#include "backends/config_reader.hpp"
#include "backends/http_client.hpp"
#include "local_engine/model.hpp"
#include "local_engine/tokenizer.hpp"

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
// A body that is not JSON is quoted up to this size (it is often an HTML page).
constexpr std::size_t kMaxQuotedBody = 200;
// A truncated echo of a secret is scrubbed from this many of its first bytes on.
constexpr std::size_t kSecretPrefix = 12;
// Header values shorter than this are not credentials (flags, versions, names).
constexpr std::size_t kMinHeaderSecret = 8;

std::string size_text(std::size_t bytes) { return std::to_string(bytes / (1024 * 1024)) + " MiB"; }

// `text` cut to `limit` bytes on a UTF-8 character boundary, marked when cut.
std::string bounded(std::string text, std::size_t limit) {
  if (text.size() <= limit) return text;
  std::size_t cut = limit;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  text.resize(cut);
  return text + "...";
}

// One call's state, shared by its coroutine (on the backend's thread) and its handle.
struct Call {
  std::shared_ptr<CompletionSink> sink;
  const SecretScrubber* scrub = nullptr;  // the backend's, which outlives its calls
  std::atomic<bool> cancelled{false};
  std::weak_ptr<net::io_context> ioc;    // the backend's: other threads reach the call through it
  UpstreamConnection* active = nullptr;  // backend thread only
  // Backend thread only: set while the call waits for a pool connection or
  // for the client; cancelling it makes the call look again.
  net::steady_timer* waiting = nullptr;
  std::int64_t prompt_estimate = 0;
  std::int64_t chunks = 0;                             // content pieces received
  const local_engine::Tokenizer* tokenizer = nullptr;  // counts `produced` when usage is not reported
  std::string produced;                                // the text, kept only with a tokenizer
  std::optional<Usage> reported;
  bool answered = false;  // the upstream accepted the call: the prompt was consumed
  std::string finish_reason;

  void emit(CompletionEvent event) {
    if (!cancelled && sink) sink->on_event(std::move(event));
  }

  Usage usage() const {
    if (reported) return *reported;
    if (!answered) return {};
    if (tokenizer) return {prompt_estimate, static_cast<std::int64_t>(tokenizer->encode(produced, false).size()), true};
    return {prompt_estimate, chunks, true};
  }

  // `body`: an embeddings answer.
  void done(std::string body = {}) {
    CompletionEvent event;
    event.type = CompletionEvent::Type::done;
    event.body = std::move(body);
    event.finish_reason = finish_reason.empty() ? "stop" : finish_reason;
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
    // Every error message passes here: whatever upstream text it quotes, no
    // credential of ours reaches the client (or a log line made from it).
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

// Resumes a read paused for the client, from any thread: the timer it waits
// on is touched on the backend's thread only. Weak, so a sink keeping this
// makes no cycle with the call that holds the sink.
void resume_read(const std::weak_ptr<Call>& weak_call, const std::weak_ptr<net::io_context>& weak_ioc) {
  auto ioc = weak_ioc.lock();
  if (!ioc) return;
  auto resume = [weak_call] {
    auto call = weak_call.lock();
    if (call && call->waiting) call->waiting->cancel();
  };
  net::post(*ioc, std::move(resume));
}

class CallHandle final : public CompletionHandle {
 public:
  explicit CallHandle(std::shared_ptr<Call> call) : call_(std::move(call)) {}

  void cancel() override {
    call_->cancelled = true;
    auto ioc = call_->ioc.lock();
    if (!ioc) return;
    // Closing the upstream connection ends the call there too (a provider
    // stops generating, and billing, when its client goes away); a call
    // waiting for a connection or for the client wakes to see the cancel.
    auto close = [call = call_] {
      if (call->active) call->active->close();
      if (call->waiting) call->waiting->cancel();
    };
    net::post(*ioc, std::move(close));
  }

 private:
  std::shared_ptr<Call> call_;
};

// What a call needs from its backend.
struct Upstream {
  OpenAICompatibleConfig config;
  SecretScrubber scrub;
  HttpClient* client = nullptr;
};

// The message for an answer that outgrew `cap`.
std::string too_large(const char* what, std::size_t cap) {
  return std::string("the upstream's ") + what + " is larger than " + size_text(cap) + "; the call was abandoned";
}

// The upstream's own words from an OpenAI-style error body, else the body
// itself; scrubbed before they are cut, so no piece of a secret survives the cut.
std::string error_message(const std::string& body, const SecretScrubber& scrub) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  if (!ec) {
    const json::value* msg = nullptr;
    if (auto* o = v.if_object()) {
      if (auto* e = o->if_contains("error")) {
        if (e->is_string()) return bounded(scrub(std::string(e->get_string())), kMaxUpstreamMessage);
        if (auto* eo = e->if_object()) msg = eo->if_contains("message");
      }
      if (!msg) msg = o->if_contains("message");
    }
    if (msg && msg->is_string()) return bounded(scrub(std::string(msg->get_string())), kMaxUpstreamMessage);
  }
  return bounded(scrub(body), kMaxQuotedBody);
}

// The upstream error's code and param, when they are short identifiers (a
// client acts on context_length_exceeded; anything else is not relayed).
void error_code_and_param(const std::string& body, BackendError& out) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  const json::object* error = nullptr;
  if (!ec && v.is_object()) {
    if (auto* e = v.get_object().if_contains("error")) error = e->if_object();
  }
  if (error == nullptr) return;
  auto identifier = [](const json::value* field) -> std::optional<std::string> {
    if (field == nullptr || !field->is_string()) return std::nullopt;
    const std::string_view s = field->get_string();
    if (s.empty() || s.size() > 64) return std::nullopt;
    for (char c : s) {
      const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                      c == '.' || c == '-' || c == '[' || c == ']';
      if (!ok) return std::nullopt;
    }
    return std::string(s);
  };
  if (auto code = identifier(error->if_contains("code"))) out.code = *code;
  out.param = identifier(error->if_contains("param"));
}

std::optional<std::int64_t> parse_retry_after(std::string_view value) {
  std::int64_t seconds = 0;
  if (value.empty()) return std::nullopt;
  for (char c : value) {
    if (c < '0' || c > '9' || seconds > 1'000'000) return std::nullopt;  // an HTTP date: the client backs off itself
    seconds = seconds * 10 + (c - '0');
  }
  return seconds;
}

}  // namespace

BackendError upstream_status_error(int status, const std::string& body, std::string_view retry_after,
                                   const SecretScrubber& scrub) {
  std::string message = error_message(body, scrub);
  std::string prefix = "upstream answered " + std::to_string(status) + ": ";
  if (status == 429) return {ErrorKind::rate_limited, prefix + message, parse_retry_after(retry_after)};
  if (status == 401 || status == 403) {
    // Our credentials, not the client's: the upstream's text may quote the key.
    return {ErrorKind::upstream_failed,
            "the upstream refused the gateway's credentials (" + std::to_string(status) + ")", std::nullopt};
  }
  if (status == 404) return {ErrorKind::not_found, prefix + message, std::nullopt};
  if (status == 408) return {ErrorKind::timeout, prefix + message, std::nullopt};
  if (status == 400 || status == 413 || status == 422) {
    BackendError e{ErrorKind::bad_request, prefix + message, std::nullopt};
    error_code_and_param(body, e);
    return e;
  }
  return {ErrorKind::upstream_failed, prefix + message, std::nullopt};
}

std::string quote_upstream(std::string text, const SecretScrubber& scrub) {
  return bounded(scrub(std::move(text)), kMaxUpstreamMessage);
}

namespace {

std::int64_t optional_int(const json::object& o, std::string_view name) {
  auto* v = o.if_contains(name);
  return v && v->is_int64() ? v->get_int64() : (v && v->is_uint64() ? static_cast<std::int64_t>(v->get_uint64()) : 0);
}

std::optional<Usage> read_usage(const json::value* v) {
  auto* o = v ? v->if_object() : nullptr;
  if (!o || !o->contains("prompt_tokens")) return std::nullopt;
  Usage u(optional_int(*o, "prompt_tokens"), optional_int(*o, "completion_tokens"));
  auto detail = [&](const char* group, const char* name) -> std::optional<std::int64_t> {
    const auto* g = o->if_contains(group);
    if (!g || !g->is_object() || !g->as_object().contains(name)) return std::nullopt;
    return optional_int(g->as_object(), name);
  };
  u.cached_tokens = detail("prompt_tokens_details", "cached_tokens");
  u.reasoning_tokens = detail("completion_tokens_details", "reasoning_tokens");
  return u;
}

// Reads usage from a response or chunk: OpenAI's `usage`, or Groq's `x_groq.usage`.
void take_usage(Call& call, const json::object& o) {
  if (auto u = read_usage(o.if_contains("usage"))) call.reported = u;
  if (auto* groq = o.if_contains("x_groq"); groq && groq->is_object()) {
    if (auto u = read_usage(groq->as_object().if_contains("usage"))) call.reported = u;
  }
}

double number_or_zero(const json::value* v) { return v && v->is_number() ? v->to_number<double>() : 0.0; }

// A token as OpenAI's chat logprobs give it: {token, logprob, bytes}.
LogprobToken chat_logprob_token(const json::object& o) {
  LogprobToken t;
  if (auto* text = o.if_contains("token"); text && text->is_string()) t.text = text->get_string();
  t.logprob = number_or_zero(o.if_contains("logprob"));
  if (auto* bytes = o.if_contains("bytes"); bytes && bytes->is_array()) {
    for (const auto& b : bytes->get_array()) {
      if (b.is_int64() && b.get_int64() >= 0 && b.get_int64() < 256) t.bytes += static_cast<char>(b.get_int64());
    }
  } else {
    t.bytes = t.text;
  }
  return t;
}

// A choice's logprobs: chat's {"content": [...]}, or the legacy parallel
// arrays of /v1/completions (its top maps ordered most likely first).
std::vector<TokenLogprob> read_logprobs(const json::value* v, bool chat) {
  std::vector<TokenLogprob> out;
  const auto* o = v ? v->if_object() : nullptr;
  if (!o) return out;
  if (chat) {
    const auto* content = o->if_contains("content");
    if (!content || !content->is_array()) return out;
    for (const auto& entry : content->get_array()) {
      const auto* e = entry.if_object();
      if (!e) continue;
      TokenLogprob lp{chat_logprob_token(*e), {}};
      if (auto* top = e->if_contains("top_logprobs"); top && top->is_array()) {
        for (const auto& t : top->get_array()) {
          if (t.is_object()) lp.top.push_back(chat_logprob_token(t.get_object()));
        }
      }
      out.push_back(std::move(lp));
    }
    return out;
  }
  const auto* tokens = o->if_contains("tokens");
  if (!tokens || !tokens->is_array()) return out;
  const auto* values = o->if_contains("token_logprobs");
  const auto* tops = o->if_contains("top_logprobs");
  for (std::size_t i = 0; i < tokens->get_array().size(); ++i) {
    const auto& token = tokens->get_array()[i];
    std::string text = token.is_string() ? std::string(token.get_string()) : std::string();
    const json::value* value =
        values && values->is_array() && i < values->get_array().size() ? &values->get_array()[i] : nullptr;
    TokenLogprob lp{{text, text, number_or_zero(value)}, {}};
    if (tops && tops->is_array() && i < tops->get_array().size()) {
      if (const auto* top = tops->get_array()[i].if_object()) {
        for (const auto& [k, lpv] : *top) {
          lp.top.push_back({std::string(k), std::string(k), number_or_zero(&lpv)});
        }
        std::stable_sort(lp.top.begin(), lp.top.end(),
                         [](const LogprobToken& a, const LogprobToken& b) { return a.logprob > b.logprob; });
      }
    }
    out.push_back(std::move(lp));
  }
  return out;
}

// What a delta or message holds besides its role and content (tool_calls,
// refusal, reasoning_content, ...), as JSON text; empty when nothing (or only nulls).
std::string extra_fields(const json::object& message) {
  json::object extra;
  for (const auto& [key, value] : message) {
    if (key == "role" || key == "content" || value.is_null()) continue;
    extra.emplace(key, value);
  }
  return extra.empty() ? std::string() : json::serialize(extra);
}

enum class Step { more, done, failed };

// One SSE data payload of a streamed answer.
Step on_stream_data(Call& call, const std::string& data, bool chat) {
  if (data == "[DONE]") return Step::done;
  boost::system::error_code ec;
  auto v = json::parse(data, ec);
  if (ec || !v.is_object()) {
    call.fail(ErrorKind::upstream_failed, "the upstream sent a malformed stream chunk");
    return Step::failed;
  }
  auto& o = v.as_object();
  if (o.contains("error")) {
    call.fail(ErrorKind::upstream_failed, "the upstream failed mid-stream: " + error_message(data, *call.scrub));
    return Step::failed;
  }
  take_usage(call, o);
  auto* choices = o.if_contains("choices");
  if (!choices || !choices->is_array() || choices->as_array().empty()) return Step::more;
  auto* choice = choices->as_array()[0].if_object();
  if (!choice) return Step::more;
  const json::value* text = nullptr;
  CompletionEvent delta;
  if (chat) {
    if (auto* d = choice->if_contains("delta"); d && d->is_object()) {
      text = d->as_object().if_contains("content");
      delta.extra_json = extra_fields(d->as_object());
    }
  } else {
    text = choice->if_contains("text");
  }
  delta.logprobs = read_logprobs(choice->if_contains("logprobs"), chat);
  if (text && text->is_string() && !text->get_string().empty()) {
    ++call.chunks;
    if (call.tokenizer) call.produced.append(text->get_string());
    delta.text = std::string(text->get_string());
  } else if (!delta.extra_json.empty()) {
    ++call.chunks;  // a piece of a tool call is produced tokens too
    if (call.tokenizer) call.produced.append(delta.extra_json);
  }
  // A chunk can carry a token's logprobs while its text waits for the rest of
  // a character, or only a piece of a tool call.
  if (!delta.text.empty() || !delta.logprobs.empty() || !delta.extra_json.empty()) call.emit(std::move(delta));
  if (auto* fr = choice->if_contains("finish_reason"); fr && fr->is_string()) {
    call.finish_reason = std::string(fr->get_string());
  }
  return Step::more;
}

// The whole non-streamed answer.
void on_full_body(Call& call, const std::string& body, bool chat) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  if (ec || !v.is_object()) {
    call.fail(ErrorKind::upstream_failed, "the upstream sent a malformed response");
    return;
  }
  auto& o = v.as_object();
  if (o.contains("error") && !o.contains("choices")) {
    // Some servers report a failure with a 200.
    call.fail(ErrorKind::upstream_failed, "the upstream failed: " + error_message(body, *call.scrub));
    return;
  }
  take_usage(call, o);
  std::string text;
  std::vector<TokenLogprob> logprobs;
  std::string extra;
  if (auto* choices = o.if_contains("choices"); choices && choices->is_array() && !choices->as_array().empty()) {
    if (auto* choice = choices->as_array()[0].if_object()) {
      logprobs = read_logprobs(choice->if_contains("logprobs"), chat);
      const json::value* t = nullptr;
      if (chat) {
        if (auto* m = choice->if_contains("message"); m && m->is_object()) {
          t = m->as_object().if_contains("content");
          extra = extra_fields(m->as_object());
        }
      } else {
        t = choice->if_contains("text");
      }
      if (t && t->is_string()) text = std::string(t->get_string());
      if (auto* fr = choice->if_contains("finish_reason"); fr && fr->is_string()) {
        call.finish_reason = std::string(fr->get_string());
      }
    }
  }
  if (!text.empty() || !logprobs.empty() || !extra.empty()) {
    // Without reported usage: one logprobs entry per token, else ~4 bytes per token.
    call.chunks = !logprobs.empty()
                      ? static_cast<std::int64_t>(logprobs.size())
                      : std::max<std::int64_t>(1, static_cast<std::int64_t>((text.size() + extra.size()) / 4));
    if (call.tokenizer) call.produced = text + extra;
    CompletionEvent delta;
    delta.text = std::move(text);
    delta.logprobs = std::move(logprobs);
    delta.extra_json = std::move(extra);
    call.emit(std::move(delta));
  }
  call.done();
}

// A whole /v1/embeddings answer: relayed as it came, under the public model name.
void on_embeddings_body(Call& call, const std::string& body, const std::string& model) {
  boost::system::error_code ec;
  auto v = json::parse(body, ec);
  if (ec || !v.is_object() || !v.as_object().contains("data")) {
    call.fail(ErrorKind::upstream_failed, "the upstream sent a malformed embeddings response");
    return;
  }
  auto& o = v.as_object();
  take_usage(call, o);
  if (o.contains("model")) o["model"] = model;
  call.done(json::serialize(o));
}

bool is_stale_connection_error(const boost::system::error_code& ec) {
  return ec == http::error::end_of_stream || ec == net::error::eof || ec == net::error::connection_reset ||
         ec == net::error::broken_pipe;
}

SteadyClock::time_point earliest(SteadyClock::time_point a, SteadyClock::time_point b) { return a < b ? a : b; }

// Reads the rest of a body into the parser, up to `cap` bytes.
net::awaitable<boost::system::error_code> read_rest(UpstreamConnection& conn, UpstreamConnection::Parser& parser,
                                                    std::size_t cap, std::chrono::milliseconds idle,
                                                    SteadyClock::time_point deadline) {
  while (!parser.is_done()) {
    if (parser.get().body().size() > cap) co_return http::error::body_limit;
    conn.expires_at(earliest(deadline, SteadyClock::now() + idle));
    auto [ec, n] = co_await conn.read_some(parser);
    if (ec) co_return ec;
  }
  co_return boost::system::error_code{};
}

http::request<http::string_body> make_request(const Upstream& up, const CompletionRequest& request) {
  const auto& origin = up.client->origin();
  const char* path = request.embeddings() ? "/embeddings" : request.chat() ? "/chat/completions" : "/completions";
  http::request<http::string_body> req{http::verb::post, origin.base_path + path, 11};
  req.set(http::field::host, origin.host_header());
  req.set(http::field::user_agent, "tollgate");
  req.set(http::field::content_type, "application/json");
  req.set(http::field::accept, request.stream ? "text/event-stream" : "application/json");
  if (!up.config.api_key.empty()) req.set(http::field::authorization, "Bearer " + up.config.api_key);
  for (const auto& [name, value] : up.config.headers) req.set(name, value);
  req.keep_alive(true);
  req.body() = upstream_request_body(request);
  req.prepare_payload();
  return req;
}

net::awaitable<void> call_upstream(Upstream* up, std::shared_ptr<Call> call, CompletionRequest request) {
  const auto& cfg = up->config;
  auto total_deadline = SteadyClock::now() + cfg.total_timeout;
  auto req = make_request(*up, request);
  auto timeout_message = [&](const char* phase) {
    return SteadyClock::now() >= total_deadline ? std::string("the upstream call exceeded the total timeout")
                                                : "the upstream timed out waiting for " + std::string(phase);
  };

  net::steady_timer wait(co_await net::this_coro::executor);
  std::unique_ptr<UpstreamConnection> conn;
  std::optional<UpstreamConnection::Parser> parser;
  // However the call ends, a later cancel() must not reach the connection or
  // the timer it held (both die here): forgotten before they are destroyed.
  struct Forget {
    Call& call;
    ~Forget() {
      call.active = nullptr;
      call.waiting = nullptr;
    }
  } forget{*call};
  for (int attempt = 0;; ++attempt) {
    ConnectFailure failure;
    auto connect_deadline = earliest(total_deadline, SteadyClock::now() + cfg.connect_timeout);
    call->waiting = &wait;
    conn = co_await up->client->acquire(connect_deadline, call->cancelled, wait, failure);
    call->waiting = nullptr;
    if (!conn) {
      if (failure.cancelled) co_return;
      call->fail(failure.timeout ? ErrorKind::timeout : ErrorKind::upstream_failed, failure.message);
      co_return;
    }
    call->active = conn.get();
    conn->expires_at(earliest(total_deadline, SteadyClock::now() + cfg.first_byte_timeout));
    parser.emplace();
    parser->body_limit(boost::none);  // streams are unbounded; read_rest caps whole bodies itself
    auto [write_ec, written] = co_await conn->write(req);
    boost::system::error_code ec = write_ec;
    if (!ec) {
      auto [read_ec, read] = co_await conn->read_header(*parser);
      ec = read_ec;
    }
    if (!ec) break;
    call->active = nullptr;
    if (call->cancelled) co_return;
    // A pooled connection the server closed while idle fails before any byte
    // of the answer: the request never reached it, so one retry is safe.
    bool stale = conn->reused && attempt == 0 && is_stale_connection_error(ec);
    conn.reset();
    if (stale) continue;
    if (ec == beast::error::timeout) {
      call->fail(ErrorKind::timeout, timeout_message("the response headers"));
    } else {
      call->fail(ErrorKind::upstream_failed, "the upstream connection failed: " + ec.message());
    }
    co_return;
  }

  int status = parser->get().result_int();
  if (status < 200 || status > 299) {
    auto ec = co_await read_rest(*conn, *parser, kMaxErrorBody, cfg.idle_timeout, total_deadline);
    call->active = nullptr;
    if (call->cancelled) co_return;
    std::string retry_after(parser->get()[http::field::retry_after]);
    auto error = upstream_status_error(status, parser->get().body(), retry_after, up->scrub);
    call->fail(std::move(error));
    if (!ec && parser->keep_alive()) up->client->release(std::move(conn));
    co_return;
  }
  call->answered = true;

  // An upstream that ignores "stream": true (some servers do) answers whole
  // JSON: read as a whole answer, it still reaches the client as a stream.
  const auto content_type = parser->get()[http::field::content_type];
  const bool whole_json = request.stream && boost::beast::iequals(content_type.substr(0, 16), "application/json");
  if (!request.stream || whole_json) {
    std::size_t cap = request.embeddings() ? kMaxEmbeddingsBody : kMaxCompletionBody;
    auto ec = co_await read_rest(*conn, *parser, cap, cfg.idle_timeout, total_deadline);
    call->active = nullptr;
    if (call->cancelled) co_return;
    if (ec == beast::error::timeout) {
      call->fail(ErrorKind::timeout, timeout_message("the response body"));
    } else if (ec == http::error::body_limit) {
      call->fail(ErrorKind::upstream_failed, too_large("response", cap));  // the connection closes with `conn`
    } else if (ec) {
      call->fail(ErrorKind::upstream_failed, "the upstream connection failed: " + ec.message());
    } else {
      if (request.embeddings()) {
        on_embeddings_body(*call, parser->get().body(), request.model);
      } else {
        on_full_body(*call, parser->get().body(), request.chat());
      }
      if (parser->keep_alive()) up->client->release(std::move(conn));
    }
    co_return;
  }

  SseDecoder sse;
  auto resume = [weak_call = std::weak_ptr<Call>(call), weak_ioc = call->ioc] { resume_read(weak_call, weak_ioc); };
  boost::system::error_code read_error;
  Step step = Step::more;
  while (step == Step::more) {
    auto bytes = std::exchange(parser->get().body(), {});
    for (const auto& data : sse.feed(bytes)) {
      step = on_stream_data(*call, data, request.chat());
      if (step != Step::more) break;
    }
    if (step != Step::more) break;
    if (sse.overflowed()) {
      // The rest of the stream is not read: the connection closes with `conn`.
      call->fail(ErrorKind::upstream_failed, too_large("stream event", std::max(kMaxSseLine, kMaxSseEvent)));
      step = Step::failed;
      break;
    }
    if (read_error) {
      call->active = nullptr;
      if (call->cancelled) co_return;
      if (read_error == beast::error::timeout) {
        call->fail(ErrorKind::timeout, timeout_message("the next chunk"));
      } else if (read_error == http::error::buffer_overflow) {
        call->fail(ErrorKind::upstream_failed, too_large("chunk framing", kMaxUpstreamReadBuffer));
      } else {
        call->fail(ErrorKind::upstream_failed, "the upstream connection failed mid-stream: " + read_error.message());
      }
      co_return;
    }
    if (parser->is_done()) {
      // Some servers end the body without [DONE]; a finish_reason means the answer was whole.
      if (call->finish_reason.empty()) {
        call->fail(ErrorKind::upstream_failed, "the upstream ended the stream before finishing");
        co_return;
      }
      step = Step::done;
      break;
    }
    // Backpressure: while the client has not taken what was sent, leave the
    // rest in the socket, so a slow client slows the upstream down. The sink
    // resumes the read when the client catches up; a cancel resumes it too.
    // Both post to this thread, so neither lands before the wait has begun.
    while (!call->cancelled && call->sink && call->sink->when_drained(cfg.max_pending_events, resume)) {
      wait.expires_at(total_deadline);
      call->waiting = &wait;
      auto [ec] = co_await wait.async_wait(as_tuple);
      call->waiting = nullptr;
      // A wake-up cancels the wait: only the total deadline lets it expire.
      if (!ec) {
        call->fail(ErrorKind::timeout, timeout_message("the client"));
        co_return;
      }
    }
    if (call->cancelled) co_return;
    conn->expires_at(earliest(total_deadline, SteadyClock::now() + cfg.idle_timeout));
    auto [ec, n] = co_await conn->read_some(*parser);
    if (call->cancelled) co_return;
    read_error = ec;
  }
  if (step == Step::failed) {
    call->active = nullptr;
    co_return;
  }
  call->done();
  // The rest of the body is normally just the chunked terminator; reading it
  // keeps the connection reusable.
  auto ec = co_await read_rest(*conn, *parser, kMaxErrorBody, cfg.idle_timeout, total_deadline);
  call->active = nullptr;
  if (!ec && parser->keep_alive()) up->client->release(std::move(conn));
}

net::awaitable<void> run_call(Upstream* up, std::shared_ptr<Call> call, CompletionRequest request) {
  try {
    co_await call_upstream(up, call, std::move(request));
  } catch (const std::exception& e) {
    call->active = nullptr;
    call->waiting = nullptr;
    call->fail(ErrorKind::internal, std::string("the upstream call failed: ") + e.what());
  }
}

class OpenAICompatibleBackend final : public Backend {
 public:
  OpenAICompatibleBackend(const OpenAICompatibleConfig& config, UpstreamOrigin origin)
      : ioc_(std::make_shared<net::io_context>(1)), work_(net::make_work_guard(*ioc_)) {
    up_.config = config;
    up_.scrub = SecretScrubber(config.api_key, config.headers);
    if (!config.tokenizer_path.empty()) {
      try {
        tokenizer_ = std::make_unique<local_engine::Tokenizer>(local_engine::load_vocabulary(config.tokenizer_path));
      } catch (const std::exception& e) {
        throw std::invalid_argument("backend '" + config.name + "': tokenizer: " + e.what());
      }
    }
    HttpClientOptions options;
    options.connect_timeout = config.connect_timeout;
    options.max_connections = config.max_connections;
    options.ca_file = config.ca_file;
    options.insecure_skip_verify = config.insecure_skip_verify;
    try {
      client_ = std::make_unique<HttpClient>(*ioc_, std::move(origin), options);
    } catch (const boost::system::system_error& e) {
      throw std::invalid_argument("backend '" + config.name + "': cannot load the TLS trust store: " + e.what());
    }
    up_.client = client_.get();
    if (config.insecure_skip_verify && client_->origin().tls) {
      std::cerr << "tollgate: warning: backend '" << config.name
                << "': insecure_skip_verify is on: the upstream's TLS certificate is not verified" << std::endl;
    }
    thread_ = std::thread([this] { ioc_->run(); });
  }

  ~OpenAICompatibleBackend() override {
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
  std::string type() const override { return "openai"; }
  Capabilities capabilities() const override {
    Capabilities c;
    c.embeddings = true;  // besides chat, completions and streaming
    return c;
  }

  std::int64_t prepare(CompletionRequest& request) const override {
    auto prepared = std::make_shared<PreparedPrompt>();
    prepared->backend = this;
    prepared->count = count_prompt(request);
    request.prepared = prepared;
    return prepared->count;
  }
  // Counting with a tokenizer encodes the whole prompt.
  bool costly_prepare() const override { return tokenizer_ != nullptr; }

  std::int64_t count_prompt(const CompletionRequest& request) const {
    // The chat template is the upstream's: a few tokens per message for it.
    if (tokenizer_) {
      if (!request.chat()) return static_cast<std::int64_t>(tokenizer_->encode(request.prompt, true).size());
      std::int64_t n = 0;
      for (const auto& m : request.messages)
        n += static_cast<std::int64_t>(tokenizer_->encode(m.content, false).size()) + 4;
      return n;
    }
    return estimate_prompt_tokens(request);
  }

  std::unique_ptr<CompletionHandle> start(CompletionRequest request, std::shared_ptr<CompletionSink> sink) override {
    auto call = std::make_shared<Call>();
    call->sink = std::move(sink);
    call->scrub = &up_.scrub;
    call->prompt_estimate =
        request.prepared && request.prepared->backend == this ? request.prepared->count : count_prompt(request);
    call->tokenizer = tokenizer_.get();
    call->ioc = ioc_;
    net::co_spawn(*ioc_, run_call(&up_, call, std::move(request)), net::detached);
    return std::make_unique<CallHandle>(std::move(call));
  }

  // The same call to the upstream's /embeddings; its answer comes as the done event's body.
  std::unique_ptr<CompletionHandle> embed(CompletionRequest request, std::shared_ptr<CompletionSink> sink) override {
    return start(std::move(request), std::move(sink));
  }

 private:
  Upstream up_;
  std::unique_ptr<local_engine::Tokenizer> tokenizer_;
  std::shared_ptr<net::io_context> ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::unique_ptr<HttpClient> client_;
  std::thread thread_;
};

}  // namespace

std::int64_t estimate_prompt_tokens(const CompletionRequest& request) {
  std::size_t bytes = request.prompt.size();
  std::int64_t overhead = 0;
  for (const auto& m : request.messages) {
    bytes += m.content.size();
    overhead += 4;
  }
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(bytes / 4) + overhead);
}

std::string upstream_request_body(const CompletionRequest& request) {
  const std::string& model = request.upstream_model.empty() ? request.model : request.upstream_model;
  if (!request.body.empty()) {
    // The client's body as it came (tools, response_format, images and all),
    // with the deployment's model name, and usage asked for when streaming.
    boost::system::error_code ec;
    auto v = json::parse(request.body, ec);
    if (!ec && v.is_object()) {
      auto& o = v.as_object();
      o["model"] = model;
      o.erase("stream_options");
      if (request.embeddings()) o.erase("stream");
      if (request.stream) o["stream_options"] = json::object{{"include_usage", true}};
      return json::serialize(o);
    }
  }
  json::object o;
  o["model"] = model;
  if (request.chat()) {
    json::array messages;
    for (const auto& m : request.messages) messages.push_back(json::object{{"role", m.role}, {"content", m.content}});
    o["messages"] = std::move(messages);
  } else {
    o["prompt"] = request.prompt;
  }
  if (request.max_tokens) o["max_tokens"] = *request.max_tokens;
  // Defaults are left out: some providers refuse parameters a model lacks.
  if (request.temperature != 1.0) o["temperature"] = request.temperature;
  if (request.top_p != 1.0) o["top_p"] = request.top_p;
  if (request.presence_penalty != 0.0) o["presence_penalty"] = request.presence_penalty;
  if (request.frequency_penalty != 0.0) o["frequency_penalty"] = request.frequency_penalty;
  if (request.seed) o["seed"] = *request.seed;
  if (request.logprobs) {
    if (!request.chat()) {
      o["logprobs"] = *request.logprobs;
    } else {
      o["logprobs"] = true;
      if (*request.logprobs > 0) o["top_logprobs"] = *request.logprobs;
    }
  }
  if (!request.stop.empty()) {
    json::array stop;
    for (const auto& s : request.stop) stop.push_back(json::string(s));
    o["stop"] = std::move(stop);
  }
  if (request.stream) {
    o["stream"] = true;
    o["stream_options"] = json::object{{"include_usage", true}};
  }
  return json::serialize(o);
}

SecretScrubber::SecretScrubber(const std::string& api_key,
                               const std::vector<std::pair<std::string, std::string>>& headers) {
  add(api_key);
  for (const auto& header : headers) {
    if (header.second.size() >= kMinHeaderSecret) add(header.second);
  }
  // Longest first, so a secret that contains another is masked whole.
  std::sort(forms_.begin(), forms_.end(), [](const std::string& a, const std::string& b) {
    return a.size() != b.size() ? a.size() > b.size() : a < b;
  });
  forms_.erase(std::unique(forms_.begin(), forms_.end()), forms_.end());
}

void SecretScrubber::add(const std::string& secret) {
  if (secret.empty()) return;
  secrets_.push_back(secret);
  forms_.push_back(secret);
  // Inside a JSON string, as Boost.JSON and most encoders write it, and with
  // the optional escape of '/' some encoders (PHP's) add.
  std::string quoted = json::serialize(json::string(secret));
  std::string in_json = quoted.substr(1, quoted.size() - 2);
  forms_.push_back(in_json);
  std::string slash_escaped;
  for (char c : in_json) slash_escaped += c == '/' ? std::string("\\/") : std::string(1, c);
  forms_.push_back(std::move(slash_escaped));
  // In a URL (an echoed query string).
  std::string in_url;
  for (unsigned char c : secret) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      in_url += static_cast<char>(c);
    } else {
      static constexpr char kHex[] = "0123456789ABCDEF";
      in_url += {'%', kHex[c >> 4], kHex[c & 15]};
    }
  }
  forms_.push_back(std::move(in_url));
}

std::string SecretScrubber::operator()(std::string text) const {
  static constexpr std::string_view kMask = "***";
  for (const auto& form : forms_) {
    for (auto at = text.find(form); at != std::string::npos; at = text.find(form, at + kMask.size())) {
      text.replace(at, form.size(), kMask);
    }
  }
  // An upstream that cut the quote short still showed the secret's start.
  for (const auto& secret : secrets_) {
    if (secret.size() <= kSecretPrefix) continue;
    std::string_view start(secret.data(), kSecretPrefix);
    for (auto at = text.find(start); at != std::string::npos; at = text.find(start, at + kMask.size())) {
      std::size_t n = kSecretPrefix;
      while (n < secret.size() && at + n < text.size() && text[at + n] == secret[n]) ++n;
      text.replace(at, n, kMask);
    }
  }
  // Any bearer token: an echo of an Authorization header, ours or one we do not know.
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  static constexpr std::string_view kBearer = "bearer ";
  std::string out;
  std::size_t copied = 0;
  for (auto at = lower.find(kBearer); at != std::string::npos; at = lower.find(kBearer, at + 1)) {
    std::size_t begin = at + kBearer.size();
    while (begin < text.size() && text[begin] == ' ') ++begin;
    std::size_t end = begin;
    auto token_char = [](unsigned char c) {
      return std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/' || c == '=';
    };
    while (end < text.size() && token_char(static_cast<unsigned char>(text[end]))) ++end;
    if (end == begin) continue;
    out.append(text, copied, begin - copied);
    out += kMask;
    copied = end;
    at = end - 1;
  }
  if (copied == 0) return text;
  out.append(text, copied, std::string::npos);
  return out;
}

std::unique_ptr<Backend> make_openai_compatible_backend(const OpenAICompatibleConfig& config) {
  std::string error;
  auto origin = parse_base_url(config.base_url, error);
  if (!origin) throw std::invalid_argument("backend '" + config.name + "': base_url " + error);
  return std::make_unique<OpenAICompatibleBackend>(config, std::move(*origin));
}

namespace {

std::unique_ptr<Backend> make_openai(const OpenAICompatibleConfig& config, const BackendContext&) {
  try {
    return make_openai_compatible_backend(config);
  } catch (const std::invalid_argument& e) {
    throw ConfigError(e.what());
  }
}

std::shared_ptr<const BackendSpec> parse_openai(const ConfigReader& r, const YAML::Node& node, const std::string& path,
                                                const std::string& name) {
  r.expect_map(node, path,
               {"name", "type", "base_url", "api_key", "headers", "timeouts", "max_connections", "ca_file",
                "insecure_skip_verify", "tokenizer"});
  OpenAICompatibleConfig c;
  c.name = name;
  if (auto n = node["tokenizer"]) c.tokenizer_path = r.string(n, child_path(path, "tokenizer"));
  if (!node["base_url"]) r.fail(path, "missing key 'base_url'");
  c.base_url = r.string(node["base_url"], child_path(path, "base_url"));
  if (!c.base_url.starts_with("http://") && !c.base_url.starts_with("https://")) {
    r.fail(child_path(path, "base_url"), "must start with http:// or https://");
  }
  // May be empty: a local vLLM or llama.cpp server often wants no key.
  if (auto n = node["api_key"]) c.api_key = r.scalar(n, child_path(path, "api_key"));
  if (auto n = node["headers"]) {
    auto hpath = child_path(path, "headers");
    if (!n.IsMap()) r.fail(hpath, "expected a mapping of header names to values");
    for (const auto& h : n) {
      auto header = h.first.as<std::string>();
      c.headers.emplace_back(header, r.scalar(h.second, child_path(hpath, header)));
    }
  }
  if (auto n = node["timeouts"]) {
    auto tpath = child_path(path, "timeouts");
    r.expect_map(n, tpath, {"connect", "first_byte", "idle", "total"});
    std::pair<const char*, std::chrono::milliseconds*> timeouts[] = {{"connect", &c.connect_timeout},
                                                                     {"first_byte", &c.first_byte_timeout},
                                                                     {"idle", &c.idle_timeout},
                                                                     {"total", &c.total_timeout}};
    for (auto [key, target] : timeouts) {
      if (!n[key]) continue;
      *target = r.duration(n[key], child_path(tpath, key));
      if (target->count() <= 0) r.fail(child_path(tpath, key), "must be positive");
    }
  }
  if (auto n = node["max_connections"]) {
    c.max_connections = static_cast<std::size_t>(r.integer(n, child_path(path, "max_connections"), 1, 100'000));
  }
  if (auto n = node["ca_file"]) c.ca_file = r.string(n, child_path(path, "ca_file"));
  if (auto n = node["insecure_skip_verify"]) {
    c.insecure_skip_verify = r.boolean(n, child_path(path, "insecure_skip_verify"));
  }
  return std::make_shared<BackendSpecOf<OpenAICompatibleConfig>>(std::move(c), make_openai);
}

}  // namespace

BackendType openai_backend_type() { return {"openai", parse_openai}; }

}  // namespace tollgate::backends
