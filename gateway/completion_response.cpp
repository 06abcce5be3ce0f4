#include "gateway/completion_response.hpp"

#include <openssl/rand.h>

#include <algorithm>
#include <boost/json.hpp>
#include <chrono>

namespace tollgate::gateway {
namespace json = boost::json;
namespace {

std::string random_id(std::string_view prefix) {
  static constexpr char kAlphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  unsigned char bytes[24];
  if (RAND_bytes(bytes, sizeof bytes) != 1) throw std::runtime_error("RAND_bytes failed");
  std::string id(prefix);
  for (unsigned char b : bytes) id += kAlphabet[b % 62];  // ids need uniqueness, not uniformity
  return id;
}

json::object usage_object(const backends::Usage& usage) {
  json::object o{{"prompt_tokens", usage.prompt_tokens},
                 {"completion_tokens", usage.completion_tokens},
                 {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
  if (usage.cached_tokens) o["prompt_tokens_details"] = json::object{{"cached_tokens", *usage.cached_tokens}};
  if (usage.reasoning_tokens) {
    o["completion_tokens_details"] = json::object{{"reasoning_tokens", *usage.reasoning_tokens}};
  }
  return o;
}

std::string sse(const json::value& v) { return "data: " + json::serialize(v) + "\n\n"; }

json::array byte_values(std::string_view bytes) {
  json::array a;
  a.reserve(bytes.size());
  for (unsigned char b : bytes) a.push_back(b);
  return a;
}

json::object chat_token(const backends::LogprobToken& t) {
  return {{"token", t.text}, {"logprob", t.logprob}, {"bytes", byte_values(t.bytes)}};
}

std::int64_t code_points(std::string_view text) {
  return std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
}

// Chat: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}.
// Legacy completions: parallel arrays, each top_logprobs entry a map that
// always holds the chosen token, and text_offset counting code points.
json::value logprobs_json(bool chat, const std::vector<backends::TokenLogprob>& logprobs, std::int64_t& text_offset) {
  if (chat) {
    json::array content;
    content.reserve(logprobs.size());
    for (const auto& lp : logprobs) {
      auto entry = chat_token(lp.chosen);
      json::array top;
      for (const auto& t : lp.top) top.push_back(chat_token(t));
      entry["top_logprobs"] = std::move(top);
      content.push_back(std::move(entry));
    }
    return json::object{{"content", std::move(content)}, {"refusal", nullptr}};
  }
  json::array tokens, token_logprobs, top_logprobs, text_offsets;
  for (const auto& lp : logprobs) {
    tokens.push_back(json::string(lp.chosen.text));
    token_logprobs.push_back(lp.chosen.logprob);
    json::object top;
    for (const auto& t : lp.top) top.emplace(t.text, t.logprob);  // the likelier of two equal texts wins
    top.emplace(lp.chosen.text, lp.chosen.logprob);
    top_logprobs.push_back(std::move(top));
    text_offsets.push_back(text_offset);
    text_offset += code_points(lp.chosen.text);
  }
  return json::object{{"tokens", std::move(tokens)},
                      {"token_logprobs", std::move(token_logprobs)},
                      {"top_logprobs", std::move(top_logprobs)},
                      {"text_offset", std::move(text_offsets)}};
}

// Adds a backend's extra message fields (tool_calls, refusal, ...) to a chat
// delta or message; the gateway's own role and content stay.
void merge_extra(json::object& message, std::string_view extra_json) {
  if (extra_json.empty()) return;
  boost::system::error_code ec;
  auto extra = json::parse(extra_json, ec);
  if (ec || !extra.is_object()) return;
  for (auto& [key, value] : extra.as_object()) {
    if (key != "role" && key != "content") message[key] = std::move(value);
  }
}

}  // namespace

CompletionFormatter::CompletionFormatter(bool chat, std::string model, bool include_usage, bool logprobs)
    : chat_(chat),
      model_(std::move(model)),
      include_usage_(include_usage),
      logprobs_(logprobs),
      id_(random_id(chat ? "chatcmpl-" : "cmpl-")),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                   .count()) {}

std::string CompletionFormatter::chunk(std::string_view text, const char* finish_reason, bool with_role,
                                       const std::vector<backends::TokenLogprob>* logprobs,
                                       std::string_view extra_json) {
  json::object choice{{"index", 0}};
  if (chat_) {
    json::object delta;
    if (with_role) delta["role"] = "assistant";
    // A delta of only a tool call's piece has no content, as OpenAI sends it.
    if (!finish_reason && (!text.empty() || extra_json.empty())) delta["content"] = text;
    merge_extra(delta, extra_json);
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = logprobs_ && logprobs ? logprobs_json(chat_, *logprobs, text_offset_) : json::value(nullptr);
  choice["finish_reason"] = finish_reason ? json::value(finish_reason) : json::value(nullptr);
  json::object o{{"id", id_},
                 {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array{std::move(choice)}}};
  if (include_usage_) o["usage"] = nullptr;
  return sse(o);
}

std::string CompletionFormatter::delta_event(std::string_view text, const std::vector<backends::TokenLogprob>& logprobs,
                                             std::string_view extra_json) {
  bool with_role = chat_ && !sent_role_;
  sent_role_ = true;
  return chunk(text, nullptr, with_role, &logprobs, extra_json);
}

std::string CompletionFormatter::finish_event(std::string_view finish_reason) {
  std::string reason(finish_reason);
  bool with_role = chat_ && !sent_role_;
  sent_role_ = true;
  return chunk("", reason.c_str(), with_role, nullptr, {});
}

std::string CompletionFormatter::usage_event(const backends::Usage& usage) const {
  json::object o{{"id", id_},
                 {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array{}},
                 {"usage", usage_object(usage)}};
  return sse(o);
}

std::string CompletionFormatter::error_event(const ApiError& error) const { return "data: " + error.body() + "\n\n"; }

std::string CompletionFormatter::full_response(std::string_view text, std::string_view finish_reason,
                                               const backends::Usage& usage,
                                               const std::vector<backends::TokenLogprob>& logprobs,
                                               std::string_view extra_json) {
  json::object choice{{"index", 0}};
  if (chat_) {
    // A message that only calls tools has null content, as OpenAI's does.
    json::object message{{"role", "assistant"},
                         {"content", text.empty() && !extra_json.empty() ? json::value(nullptr) : json::value(text)}};
    merge_extra(message, extra_json);
    choice["message"] = std::move(message);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = logprobs_ ? logprobs_json(chat_, logprobs, text_offset_) : json::value(nullptr);
  choice["finish_reason"] = finish_reason;
  json::object o{{"id", id_},
                 {"object", chat_ ? "chat.completion" : "text_completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array{std::move(choice)}},
                 {"usage", usage_object(usage)}};
  return json::serialize(o);
}

}  // namespace tollgate::gateway
