#include "gateway/completion_response.hpp"

#include <openssl/rand.h>

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
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

std::string sse(const json::value& v) { return "data: " + json::serialize(v) + "\n\n"; }

}  // namespace

CompletionFormatter::CompletionFormatter(bool chat, std::string model, bool include_usage)
    : chat_(chat),
      model_(std::move(model)),
      include_usage_(include_usage),
      id_(random_id(chat ? "chatcmpl-" : "cmpl-")),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                   .count()) {}

std::string CompletionFormatter::chunk(std::string_view text, const char* finish_reason, bool with_role) const {
  json::object choice{{"index", 0}};
  if (chat_) {
    json::object delta;
    if (with_role) delta["role"] = "assistant";
    if (!finish_reason) delta["content"] = text;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason ? json::value(finish_reason) : json::value(nullptr);
  json::object o{{"id", id_},
                 {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
                 {"created", created_},
                 {"model", model_},
                 {"choices", json::array{std::move(choice)}}};
  if (include_usage_) o["usage"] = nullptr;
  return sse(o);
}

std::string CompletionFormatter::delta_event(std::string_view text) {
  bool with_role = chat_ && !sent_role_;
  sent_role_ = true;
  return chunk(text, nullptr, with_role);
}

std::string CompletionFormatter::finish_event(std::string_view finish_reason) {
  std::string reason(finish_reason);
  bool with_role = chat_ && !sent_role_;
  sent_role_ = true;
  return chunk("", reason.c_str(), with_role);
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
                                               const backends::Usage& usage) const {
  json::object choice{{"index", 0}};
  if (chat_) {
    choice["message"] = json::object{{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
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
