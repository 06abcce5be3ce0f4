#include "gateway/completion_request.hpp"

#include <algorithm>
#include <boost/json.hpp>
#include <cmath>
#include <limits>
#include <sstream>

namespace tollgate::gateway {
namespace json = boost::json;
namespace {

constexpr std::int64_t kMaxTokensCap = 1'000'000;
constexpr std::size_t kMaxStopSequences = 4;
constexpr std::int64_t kMaxTopLogprobs = 20;
// A client's string is echoed in an error only up to this size (DESIGN.md:
// every string a client sends is bounded before it is echoed).
constexpr std::size_t kMaxEchoedValue = 32;

using Result = std::variant<ParsedCompletion, ApiError>;

std::optional<ApiError> read_number(const json::object& o, const char* name, double min, double max, double& out) {
  auto it = o.find(name);
  if (it == o.end() || it->value().is_null()) return std::nullopt;
  const auto& v = it->value();
  if (!v.is_number()) return bad_request(std::string("'") + name + "' must be a number", name, "invalid_type");
  double d = v.to_number<double>();
  if (!std::isfinite(d) || d < min || d > max) {
    // Plain decimal bounds ("0 and 2"): json::serialize would write "0E0 and 2E0".
    auto text = [](double x) {
      std::ostringstream s;
      s << x;
      return s.str();
    };
    return bad_request(std::string("'") + name + "' must be between " + text(min) + " and " + text(max), name);
  }
  out = d;
  return std::nullopt;
}

// An integer within [min, max]; 2.0 counts as an integer, as JSON means it.
std::optional<ApiError> read_integer(const json::object& o, const char* name, std::int64_t min, std::int64_t max,
                                     std::optional<std::int64_t>& out) {
  auto it = o.find(name);
  if (it == o.end() || it->value().is_null()) return std::nullopt;
  const auto& v = it->value();
  bool integral = v.is_int64() || v.is_uint64() || (v.is_double() && std::floor(v.get_double()) == v.get_double());
  if (!integral) return bad_request(std::string("'") + name + "' must be an integer", name, "invalid_type");
  double d = v.to_number<double>();
  if (d < static_cast<double>(min) || d > static_cast<double>(max)) {
    return bad_request(
        std::string("'") + name + "' must be between " + std::to_string(min) + " and " + std::to_string(max), name);
  }
  out = static_cast<std::int64_t>(d);
  return std::nullopt;
}

std::optional<ApiError> read_bool(const json::object& o, const char* name, bool& out) {
  auto it = o.find(name);
  if (it == o.end() || it->value().is_null()) return std::nullopt;
  if (!it->value().is_bool()) return bad_request(std::string("'") + name + "' must be a boolean", name, "invalid_type");
  out = it->value().get_bool();
  return std::nullopt;
}

// A message's content: a string, or an array of parts: {"type":"text","text":...}
// parts make the text; others (images, audio) only flag the request.
std::optional<ApiError> read_content(const json::value& v, const std::string& param, std::string& out, bool& non_text) {
  if (v.is_string()) {
    out = v.get_string();
    return std::nullopt;
  }
  if (v.is_array()) {
    for (const auto& part : v.get_array()) {
      const auto* p = part.if_object();
      const json::value* type = p ? p->if_contains("type") : nullptr;
      if (!type || !type->is_string()) {
        return bad_request("each content part must be an object with a 'type'", param, "invalid_type");
      }
      if (type->get_string() != "text") {
        non_text = true;
        continue;
      }
      const json::value* text = p->if_contains("text");
      if (!text || !text->is_string()) return bad_request("a text part needs a string 'text'", param, "invalid_type");
      out += text->get_string();
    }
    return std::nullopt;
  }
  return bad_request("'content' must be a string or an array of text parts", param, "invalid_type");
}

std::optional<ApiError> read_messages(const json::object& o, backends::CompletionRequest& r) {
  auto it = o.find("messages");
  if (it == o.end()) return bad_request("'messages' is required", "messages", "missing_required_parameter");
  if (!it->value().is_array()) return bad_request("'messages' must be an array", "messages", "invalid_type");
  const auto& messages = it->value().get_array();
  if (messages.empty()) return bad_request("'messages' must not be empty", "messages");
  for (std::size_t i = 0; i < messages.size(); ++i) {
    std::string param = "messages[" + std::to_string(i) + "]";
    const auto* m = messages[i].if_object();
    if (!m) return bad_request(param + " must be an object", param, "invalid_type");
    const json::value* role = m->if_contains("role");
    if (!role || !role->is_string()) {
      return bad_request(param + " needs a string 'role'", param + ".role", "invalid_type");
    }
    std::string_view role_name = role->get_string();
    if (role_name != "system" && role_name != "user" && role_name != "assistant" && role_name != "tool" &&
        role_name != "developer") {
      std::string shown = role_name.size() <= kMaxEchoedValue ? " '" + std::string(role_name) + "'" : "";
      return bad_request("unknown role" + shown, param + ".role");
    }
    backends::ChatMessage message{std::string(role_name), {}};
    const json::value* content = m->if_contains("content");
    // An assistant turn that only called tools carries no content.
    bool content_optional = role_name == "assistant";
    if (!content || content->is_null()) {
      if (!content_optional) {
        return bad_request(param + " needs 'content'", param + ".content", "missing_required_parameter");
      }
    } else if (auto e = read_content(*content, param + ".content", message.content, r.non_text_content)) {
      return e;
    }
    r.messages.push_back(std::move(message));
  }
  return std::nullopt;
}

std::optional<ApiError> read_prompt(const json::object& o, backends::CompletionRequest& r) {
  auto it = o.find("prompt");
  if (it == o.end()) return bad_request("'prompt' is required", "prompt", "missing_required_parameter");
  const auto& v = it->value();
  if (v.is_string()) {
    r.prompt = v.get_string();
    return std::nullopt;
  }
  if (v.is_array()) {
    const auto& a = v.get_array();
    if (a.size() == 1 && a[0].is_string()) {
      r.prompt = a[0].get_string();
      return std::nullopt;
    }
    return bad_request(
        "'prompt' must be a string or an array of one string (batches and token arrays are not supported)", "prompt",
        "unsupported_value");
  }
  return bad_request("'prompt' must be a string", "prompt", "invalid_type");
}

std::optional<ApiError> read_max_tokens(const json::object& o, backends::CompletionRequest& r) {
  for (const char* name : {"max_completion_tokens", "max_tokens"}) {
    auto it = o.find(name);
    if (it == o.end() || it->value().is_null()) continue;
    const auto& v = it->value();
    std::int64_t n = 0;
    if (v.is_int64()) {
      n = v.get_int64();
    } else if (v.is_uint64()) {
      n = kMaxTokensCap + 1;
    } else if (v.is_double() && std::floor(v.get_double()) == v.get_double()) {
      n = static_cast<std::int64_t>(std::clamp(v.get_double(), -1.0, double(kMaxTokensCap + 1)));
    } else {
      return bad_request(std::string("'") + name + "' must be an integer", name, "invalid_type");
    }
    if (n < 1 || n > kMaxTokensCap) {
      return bad_request(std::string("'") + name + "' must be between 1 and " + std::to_string(kMaxTokensCap), name);
    }
    r.max_tokens = n;
    return std::nullopt;
  }
  return std::nullopt;
}

std::optional<ApiError> read_stop(const json::object& o, backends::CompletionRequest& r) {
  auto it = o.find("stop");
  if (it == o.end() || it->value().is_null()) return std::nullopt;
  const auto& v = it->value();
  auto add = [&](const json::value& s) -> std::optional<ApiError> {
    if (!s.is_string()) return bad_request("'stop' must be a string or an array of strings", "stop", "invalid_type");
    if (s.get_string().empty()) return bad_request("stop sequences must not be empty", "stop");
    r.stop.emplace_back(s.get_string());
    return std::nullopt;
  };
  if (v.is_array()) {
    if (v.get_array().size() > kMaxStopSequences) {
      return bad_request("at most " + std::to_string(kMaxStopSequences) + " stop sequences are allowed", "stop");
    }
    for (const auto& s : v.get_array()) {
      if (auto e = add(s)) return e;
    }
    return std::nullopt;
  }
  return add(v);
}

// Chat asks with "logprobs": true and "top_logprobs": N; the legacy
// completions API with "logprobs": N.
std::optional<ApiError> read_logprobs(const json::object& o, bool chat, backends::CompletionRequest& r) {
  std::optional<std::int64_t> top;
  if (!chat) {
    if (auto e = read_integer(o, "logprobs", 0, kMaxTopLogprobs, top)) return e;
    if (top) r.logprobs = static_cast<std::int32_t>(*top);
    return std::nullopt;
  }
  bool wanted = false;
  if (auto e = read_bool(o, "logprobs", wanted)) return e;
  if (auto e = read_integer(o, "top_logprobs", 0, kMaxTopLogprobs, top)) return e;
  if (top && !wanted) return bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs");
  if (wanted) r.logprobs = static_cast<std::int32_t>(top.value_or(0));
  return std::nullopt;
}

// The body as a JSON object, or the 400 that says why it is not one.
std::variant<json::value, ApiError> parse_object(std::string_view body) {
  json::error_code ec;
  json::value root = json::parse(body, ec);
  if (ec) {
    if (ec == json::error::syntax || ec == json::error::incomplete || ec == json::error::extra_data) {
      return bad_request("the request body is not valid JSON (" + ec.message() + ")", std::nullopt, "invalid_json");
    }
    return bad_request("the request body could not be parsed: " + ec.message(), std::nullopt, "invalid_json");
  }
  if (!root.is_object()) return bad_request("the request body must be a JSON object", std::nullopt, "invalid_json");
  return root;
}

std::optional<ApiError> read_model(const json::object& o, backends::CompletionRequest& r) {
  const json::value* model = o.if_contains("model");
  if (!model) return bad_request("'model' is required", "model", "missing_required_parameter");
  if (!model->is_string()) return bad_request("'model' must be a string", "model", "invalid_type");
  if (model->get_string().empty()) return bad_request("'model' must not be empty", "model");
  if (model->get_string().size() > kMaxModelName) {
    return bad_request("'model' is longer than " + std::to_string(kMaxModelName) + " bytes", "model",
                       "string_above_max_length");
  }
  r.model = model->get_string();
  return std::nullopt;
}

// logit_bias: {"token id": bias in -100..100}, as OpenAI checks it.
std::optional<ApiError> read_logit_bias(const json::object& o, backends::CompletionRequest& r) {
  const json::value* bias = o.if_contains("logit_bias");
  if (!bias || bias->is_null()) return std::nullopt;
  if (!bias->is_object()) return bad_request("'logit_bias' must be an object", "logit_bias", "invalid_type");
  constexpr std::size_t kMaxBiases = 1024;
  if (bias->get_object().size() > kMaxBiases) {
    return bad_request("'logit_bias' may hold at most " + std::to_string(kMaxBiases) + " tokens", "logit_bias");
  }
  for (const auto& [key, value] : bias->get_object()) {
    std::int64_t id = -1;
    const bool digits = !key.empty() && key.size() <= 10 &&
                        std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (digits) id = std::stoll(std::string(key));
    if (!digits || id > std::numeric_limits<std::int32_t>::max()) {
      std::string shown = key.size() <= kMaxEchoedValue ? ", got '" + std::string(key) + "'" : "";
      return bad_request("'logit_bias' keys must be token ids" + shown, "logit_bias", "invalid_value");
    }
    if (!value.is_number() || value.to_number<double>() < -100 || value.to_number<double>() > 100) {
      return bad_request("'logit_bias' values must be numbers from -100 to 100", "logit_bias", "invalid_value");
    }
    r.logit_bias.emplace_back(static_cast<std::int32_t>(id), static_cast<float>(value.to_number<double>()));
  }
  return std::nullopt;
}

// tools, tool_choice, response_format, echo and suffix: checked for shape
// here, forwarded in `body` to remote backends, refused by the local engine.
std::optional<ApiError> read_forwarded_only(const json::object& o, bool chat, backends::CompletionRequest& r) {
  bool has_tools = false;
  if (const json::value* tools = o.if_contains("tools"); tools && !tools->is_null()) {
    if (!tools->is_array()) return bad_request("'tools' must be an array", "tools", "invalid_type");
    has_tools = !tools->get_array().empty();
  }
  std::string_view choice = has_tools ? "auto" : "none";
  if (const json::value* tc = o.if_contains("tool_choice"); tc && !tc->is_null()) {
    if (tc->is_string()) {
      choice = tc->get_string();
      if (choice != "none" && choice != "auto" && choice != "required") {
        return bad_request("'tool_choice' must be none, auto, required or a named tool", "tool_choice",
                           "invalid_value");
      }
    } else if (!tc->is_object()) {
      return bad_request("'tool_choice' must be a string or an object", "tool_choice", "invalid_type");
    } else {
      choice = "named";
    }
    if (!has_tools && choice != "none") {
      return bad_request("'tool_choice' is only allowed when 'tools' are specified", "tool_choice");
    }
  }
  r.tools = has_tools && choice != "none";
  if (const json::value* rf = o.if_contains("response_format"); rf && !rf->is_null()) {
    const json::value* type = rf->is_object() ? rf->get_object().if_contains("type") : nullptr;
    if (!type || !type->is_string()) {
      return bad_request("'response_format' must be an object with a 'type'", "response_format", "invalid_type");
    }
    const std::string_view t = type->get_string();
    if (t != "text" && t != "json_object" && t != "json_schema") {
      return bad_request("'response_format.type' must be text, json_object or json_schema", "response_format.type",
                         "invalid_value");
    }
    if (t != "text") r.response_format = t;
  }
  if (!chat) {
    if (auto e = read_bool(o, "echo", r.echo)) return e;
    if (const json::value* suffix = o.if_contains("suffix"); suffix && !suffix->is_null()) {
      if (!suffix->is_string()) return bad_request("'suffix' must be a string", "suffix", "invalid_type");
      r.suffix = !suffix->get_string().empty();
    }
  }
  return std::nullopt;
}

}  // namespace

Result parse_embeddings_request(std::string_view body) {
  auto root = parse_object(body);
  if (auto* e = std::get_if<ApiError>(&root)) return *e;
  const auto& o = std::get<json::value>(root).get_object();
  ParsedCompletion parsed;
  auto& r = parsed.request;
  r.endpoint = backends::Endpoint::embeddings;
  r.body = body;
  if (auto e = read_model(o, r)) return *e;
  const json::value* input = o.if_contains("input");
  if (!input || input->is_null()) return bad_request("'input' is required", "input", "missing_required_parameter");
  auto invalid = [] {
    return bad_request("'input' must be a string, an array of strings, or an array of token arrays", "input",
                       "invalid_type");
  };
  if (input->is_string()) {
    r.prompt = input->get_string();
  } else if (input->is_array()) {
    const auto& items = input->get_array();
    if (items.empty()) return bad_request("'input' must not be empty", "input");
    for (const auto& item : items) {
      if (item.is_string()) {
        r.prompt.append(item.get_string()).push_back('\n');
      } else if (item.is_int64()) {
        r.prompt.append("    ");  // a token, ~4 bytes for estimates
      } else if (item.is_array()) {
        for (const auto& t : item.get_array()) {
          if (!t.is_int64()) return invalid();
          r.prompt.append("    ");
        }
      } else {
        return invalid();
      }
    }
  } else {
    return invalid();
  }
  return parsed;
}

Result parse_completion_request(std::string_view body, bool chat) {
  auto root_or_error = parse_object(body);
  if (auto* e = std::get_if<ApiError>(&root_or_error)) return *e;
  const auto* o = &std::get<json::value>(root_or_error).get_object();

  ParsedCompletion parsed;
  auto& r = parsed.request;
  r.endpoint = chat ? backends::Endpoint::chat_completions : backends::Endpoint::completions;
  r.body = body;
  if (auto e = read_model(*o, r)) return *e;

  if (auto e = chat ? read_messages(*o, r) : read_prompt(*o, r)) return *e;
  if (auto e = read_max_tokens(*o, r)) return *e;
  if (auto e = read_stop(*o, r)) return *e;
  if (auto e = read_number(*o, "temperature", 0.0, 2.0, r.temperature)) return *e;
  if (auto e = read_number(*o, "top_p", 0.0, 1.0, r.top_p)) return *e;
  if (auto e = read_number(*o, "presence_penalty", -2.0, 2.0, r.presence_penalty)) return *e;
  if (auto e = read_number(*o, "frequency_penalty", -2.0, 2.0, r.frequency_penalty)) return *e;
  if (auto e = read_number(*o, "min_p", 0.0, 1.0, r.min_p)) return *e;
  if (auto e = read_number(*o, "repetition_penalty", 0.01, 10.0, r.repetition_penalty)) return *e;
  if (const json::value* k = o->if_contains("top_k"); k && !k->is_null()) {
    // vLLM's -1 means off, as our 0 does.
    if (!k->is_int64() || k->get_int64() < -1) {
      return bad_request("'top_k' must be an integer >= -1", "top_k", "invalid_type");
    }
    r.top_k = std::max<std::int64_t>(0, k->get_int64());
  }
  if (auto e = read_bool(*o, "stream", r.stream)) return *e;
  if (auto e = read_logprobs(*o, chat, r)) return *e;
  if (auto e = read_logit_bias(*o, r)) return *e;
  if (auto e = read_forwarded_only(*o, chat, r)) return *e;

  if (const json::value* n = o->if_contains("n"); n && !n->is_null()) {
    if (!n->is_number()) return bad_request("'n' must be an integer", "n", "invalid_type");
    if (n->to_number<double>() != 1.0) return bad_request("only n = 1 is supported", "n", "unsupported_value");
  }
  if (const json::value* seed = o->if_contains("seed"); seed && !seed->is_null()) {
    if (seed->is_int64())
      r.seed = static_cast<std::uint64_t>(seed->get_int64());
    else if (seed->is_uint64())
      r.seed = seed->get_uint64();
    else
      return bad_request("'seed' must be an integer", "seed", "invalid_type");
  }
  if (const json::value* so = o->if_contains("stream_options"); so && !so->is_null()) {
    if (!so->is_object()) return bad_request("'stream_options' must be an object", "stream_options", "invalid_type");
    if (!r.stream) {
      return bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
    }
    if (auto e = read_bool(so->get_object(), "include_usage", parsed.include_usage)) {
      e->param = "stream_options.include_usage";
      return *e;
    }
  }
  return parsed;
}

}  // namespace tollgate::gateway
