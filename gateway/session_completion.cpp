// Chat and text completions and embeddings: parse, plan, admit, then the
// completion flow with this session as its client.
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/chunk_encode.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/serializer.hpp>
#include <boost/beast/http/write.hpp>

#include "gateway/completion_flow.hpp"
#include "gateway/completion_request.hpp"
#include "gateway/session.hpp"
#include "metering/text_bounds.hpp"

namespace tollgate::gateway {
namespace {

namespace net = boost::asio;
namespace http = boost::beast::http;
using net::awaitable;
constexpr auto as_tuple = net::as_tuple(net::use_awaitable);

}  // namespace

// The completion flow's client: an HTTP answer on this session's connection,
// streamed as chunked SSE (to an HTTP/1.0 client, which knows no chunked
// coding, as a body the closing connection ends) or written whole.
class HttpCompletionClient final : public CompletionClient {
 public:
  HttpCompletionClient(Session& session, const Request& req, Exchange& x)
      : session_(session), req_(req), x_(x), head_{http::status::ok, req.version()}, chunked_(req.version() >= 11) {}

  awaitable<std::optional<std::deque<backends::CompletionEvent>>> next_events(EventQueue& queue, bool watch) override {
    co_return co_await session_.next_events(queue, watch);
  }

  awaitable<bool> send_event(std::string sse) override {
    auto& stream = session_.stream();
    stream.expires_after(session_.limits().idle_timeout);
    if (!serializer_) {
      head_.set(http::field::server, "tollgate");
      head_.set(http::field::date, http_date());
      head_.set(http::field::content_type, "text/event-stream");
      head_.set(http::field::cache_control, "no-cache");
      head_.set("x-accel-buffering", "no");
      set_rate_limit_headers(head_, x_.admission->status);
      head_.keep_alive(chunked_ && req_.keep_alive() && !session_.gw_.stopping);
      head_.chunked(chunked_);
      serializer_.emplace(head_);
      auto [ec, n] = co_await http::async_write_header(stream, *serializer_, as_tuple);
      if (ec) co_return false;
    }
    if (!chunked_) {
      auto [ec, n] = co_await net::async_write(stream, net::buffer(sse), as_tuple);
      co_return !ec;
    }
    auto [ec, n] = co_await net::async_write(stream, http::make_chunk(net::buffer(sse)), as_tuple);
    co_return !ec;
  }

  awaitable<bool> end_stream() override {
    if (!chunked_) co_return false;  // closing the connection ends the body
    auto& stream = session_.stream();
    stream.expires_after(session_.limits().idle_timeout);
    auto [ec, n] = co_await net::async_write(stream, http::make_chunk_last(), as_tuple);
    co_return !ec && head_.keep_alive() && !session_.close_after_;
  }

  awaitable<bool> send_answer(std::string body) override {
    auto res = make_response(req_, http::status::ok, std::move(body));
    set_rate_limit_headers(res, x_.admission->status);
    co_return co_await session_.write(std::move(res));
  }

  awaitable<bool> send_error(const ApiError& error) override {
    // The exchange is finished already: respond_error would count it twice.
    auto res = make_response(req_, static_cast<http::status>(error.status), error.body());
    if (error.retry_after_s) res.set(http::field::retry_after, std::to_string(*error.retry_after_s));
    set_rate_limit_headers(res, x_.admission->status);
    co_return co_await session_.write(std::move(res));
  }

  void finish(int status) override { x_.finish(status); }

  void attach(std::shared_ptr<EventQueue> queue) override { session_.conn_->events = std::move(queue); }

 private:
  Session& session_;
  const Request& req_;
  Exchange& x_;
  http::response<http::empty_body> head_;
  bool chunked_;
  std::optional<http::response_serializer<http::empty_body>> serializer_;
};

awaitable<bool> Session::handle_completion(const Request& req, Exchange& x, RouteHandler which) {
  const bool chat = which == RouteHandler::chat_completions;
  const bool embeddings = which == RouteHandler::embeddings;
  // Every request from a known key is admitted before it is judged, so bad
  // ones (malformed, unknown or forbidden model) count against its limits too.
  auto parsed = embeddings ? parse_embeddings_request(req.body()) : parse_completion_request(req.body(), chat);
  if (auto* e = std::get_if<ApiError>(&parsed)) {
    if (auto refused = co_await admit(x, 0)) {
      co_return co_await respond_error(req, x, *refused);
    }
    co_return co_await respond_error(req, x, *e);
  }
  auto& completion = std::get<ParsedCompletion>(parsed);
  CompletionJob job{std::move(completion.request), completion.include_usage, {}, 0};
  auto& creq = job.request;
  x.event.model = creq.model;

  // Messages quote a client's model name only in part.
  const std::string quoted = "'" + metering::excerpt(creq.model) + "'";
  std::optional<ApiError> refusal;
  job.plan = gw_.router.plan(creq.model);
  if (job.plan.empty()) {
    refusal = not_found("the model " + quoted + " does not exist", "model_not_found");
  } else if (!x.caller->key.allows_model(creq.model)) {
    refusal = forbidden("this API key may not use the model " + quoted);
  } else {
    std::erase_if(job.plan, [&](const backends::Deployment* d) {
      auto caps = d->backend->capabilities();
      if (embeddings) return !caps.embeddings;
      return (chat && !caps.chat) || (!chat && !caps.completions) || (creq.stream && !caps.streaming);
    });
    if (job.plan.empty()) {
      refusal =
          bad_request("the model " + quoted + " does not " +
                          (embeddings ? std::string("serve embeddings") : std::string("support this kind of request")),
                      "model");
    }
  }
  creq.user = x.caller->key.user_name;

  // A refused request reserves no tokens; one that will run reserves its prompt and its longest answer.
  // Rendered and tokenised once, off the io thread where that is costly.
  if (!refusal) job.prompt_estimate = co_await prepare_prompt(*job.plan.front()->backend, creq, &gw_.prepare_pool);
  std::int64_t reserve =
      refusal || embeddings
          ? job.prompt_estimate
          : job.prompt_estimate + creq.max_tokens.value_or(gw_.config.metering.default_reserve_tokens);
  if (auto refused = co_await admit(x, reserve)) {
    co_return co_await respond_error(req, x, *refused);
  }
  if (refusal) {
    if (refusal->status == 403) gw_.metrics.auth_failures.labels({"model_not_allowed"}).inc();
    co_return co_await respond_error(req, x, *refusal);
  }

  client_pipelined_ = false;
  HttpCompletionClient client(*this, req, x);
  CompletionContext ctx{gw_.router, gw_.metrics, gw_.cut_off, x.started, x.event, x.backend_time, &gw_.prepare_pool};
  co_return co_await run_completion(ctx, std::move(job), client);
}

}  // namespace tollgate::gateway
