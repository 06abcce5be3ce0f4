#include "gateway/completion_response.hpp"

#include <boost/json.hpp>
#include <catch2/catch.hpp>
#include <set>
#include <string>

namespace json = boost::json;
using tollgate::backends::Usage;
using tollgate::gateway::CompletionFormatter;

namespace {

// The JSON of one SSE event, checking its framing.
json::object event_json(const std::string& event) {
  INFO(event);
  REQUIRE(event.rfind("data: ", 0) == 0);
  REQUIRE(event.size() > 8);
  REQUIRE(event.substr(event.size() - 2) == "\n\n");
  auto payload = event.substr(6, event.size() - 8);
  REQUIRE(payload.find('\n') == std::string::npos);  // one data line per event
  return json::parse(payload).as_object();
}

const json::object& only_choice(const json::object& o) {
  const auto& choices = o.at("choices").as_array();
  REQUIRE(choices.size() == 1);
  CHECK(choices[0].at("index") == 0);
  return choices[0].as_object();
}

}  // namespace

TEST_CASE("chat chunks: the first delta carries the role, later ones only content", "[gateway][response]") {
  CompletionFormatter f(true, "my-model", false);
  CHECK(f.id().rfind("chatcmpl-", 0) == 0);
  CHECK(f.id().size() > 20);

  auto first = event_json(f.delta_event("Hel"));
  CHECK(first.at("id") == json::value(f.id()));
  CHECK(first.at("object") == "chat.completion.chunk");
  CHECK(first.at("model") == "my-model");
  CHECK(first.at("created").is_int64());
  CHECK(first.at("created").as_int64() > 1'600'000'000);
  CHECK_FALSE(first.contains("usage"));
  const auto& c1 = only_choice(first);
  CHECK(c1.at("delta").at("role") == "assistant");
  CHECK(c1.at("delta").at("content") == "Hel");
  CHECK(c1.at("finish_reason").is_null());
  CHECK(c1.at("logprobs").is_null());
  CHECK_FALSE(c1.contains("text"));

  auto second = event_json(f.delta_event("lo \"quoted\"\nline \xe2\x98\x83"));
  CHECK(second.at("id") == first.at("id"));
  CHECK(second.at("created") == first.at("created"));
  const auto& c2 = only_choice(second);
  CHECK_FALSE(c2.at("delta").as_object().contains("role"));
  CHECK(c2.at("delta").at("content") == "lo \"quoted\"\nline \xe2\x98\x83");
  CHECK(c2.at("finish_reason").is_null());

  auto finish = event_json(f.finish_event("length"));
  CHECK(finish.at("id") == first.at("id"));
  CHECK(finish.at("object") == "chat.completion.chunk");
  const auto& c3 = only_choice(finish);
  CHECK(c3.at("finish_reason") == "length");
  CHECK(c3.at("delta").as_object().empty());
}

TEST_CASE("a chat finish with no delta before it still carries the role", "[gateway][response]") {
  CompletionFormatter f(true, "m", false);
  auto finish = event_json(f.finish_event("stop"));
  const auto& c = only_choice(finish);
  CHECK(c.at("delta").at("role") == "assistant");
  CHECK_FALSE(c.at("delta").as_object().contains("content"));
  CHECK(c.at("finish_reason") == "stop");
}

TEST_CASE("completions chunks carry text, no delta, no role", "[gateway][response]") {
  CompletionFormatter f(false, "m", false);
  CHECK(f.id().rfind("cmpl-", 0) == 0);
  auto first = event_json(f.delta_event("once"));
  CHECK(first.at("object") == "text_completion");
  const auto& c1 = only_choice(first);
  CHECK(c1.at("text") == "once");
  CHECK_FALSE(c1.contains("delta"));
  CHECK(c1.at("finish_reason").is_null());
  CHECK(c1.at("logprobs").is_null());
  auto finish = event_json(f.finish_event("stop"));
  const auto& c2 = only_choice(finish);
  CHECK(c2.at("text") == "");
  CHECK(c2.at("finish_reason") == "stop");
}

TEST_CASE("include_usage: chunks carry a null usage, the usage event has no choices", "[gateway][response]") {
  for (bool chat : {true, false}) {
    CAPTURE(chat);
    CompletionFormatter f(chat, "m", true);
    auto delta = event_json(f.delta_event("a"));
    REQUIRE(delta.contains("usage"));
    CHECK(delta.at("usage").is_null());
    auto finish = event_json(f.finish_event("stop"));
    REQUIRE(finish.contains("usage"));
    CHECK(finish.at("usage").is_null());

    auto usage = event_json(f.usage_event(Usage{5, 7, false}));
    CHECK(usage.at("id") == json::value(f.id()));
    CHECK(usage.at("object") == (chat ? "chat.completion.chunk" : "text_completion"));
    CHECK(usage.at("model") == "m");
    CHECK(usage.at("choices").as_array().empty());
    CHECK(usage.at("usage").at("prompt_tokens") == 5);
    CHECK(usage.at("usage").at("completion_tokens") == 7);
    CHECK(usage.at("usage").at("total_tokens") == 12);
  }
}

TEST_CASE("the done event and error events", "[gateway][response]") {
  CHECK(CompletionFormatter::done_event() == "data: [DONE]\n\n");
  CompletionFormatter f(true, "m", false);
  auto error = event_json(f.error_event(tollgate::gateway::bad_request("broken", "temperature")));
  REQUIRE(error.size() == 1);
  const auto& e = error.at("error").as_object();
  CHECK(e.at("message") == "broken");
  CHECK(e.at("type") == "invalid_request_error");
  CHECK(e.at("param") == "temperature");
  CHECK(e.at("code") == "invalid_value");
}

TEST_CASE("full responses: chat.completion and text_completion", "[gateway][response]") {
  CompletionFormatter chat(true, "m", true);
  auto c = json::parse(chat.full_response("hello \"world\"", "stop", Usage{3, 2, true})).as_object();
  CHECK(c.at("id") == json::value(chat.id()));
  CHECK(c.at("object") == "chat.completion");
  CHECK(c.at("model") == "m");
  CHECK(c.at("created").is_int64());
  const auto& choice = only_choice(c);
  CHECK(choice.at("message").at("role") == "assistant");
  CHECK(choice.at("message").at("content") == "hello \"world\"");
  CHECK(choice.at("finish_reason") == "stop");
  CHECK(choice.at("logprobs").is_null());
  CHECK_FALSE(choice.contains("delta"));
  CHECK(c.at("usage").at("prompt_tokens") == 3);
  CHECK(c.at("usage").at("completion_tokens") == 2);
  CHECK(c.at("usage").at("total_tokens") == 5);

  CompletionFormatter text(false, "m2", false);
  auto t = json::parse(text.full_response("", "length", Usage{})).as_object();
  CHECK(t.at("object") == "text_completion");
  CHECK(t.at("model") == "m2");
  const auto& tc = only_choice(t);
  CHECK(tc.at("text") == "");
  CHECK_FALSE(tc.contains("message"));
  CHECK(tc.at("finish_reason") == "length");
  CHECK(t.at("usage").at("total_tokens") == 0);
}

TEST_CASE("every formatter has its own id", "[gateway][response]") {
  std::set<std::string> ids;
  for (int i = 0; i < 100; ++i) ids.insert(CompletionFormatter(i % 2 == 0, "m", false).id());
  CHECK(ids.size() == 100);
}

TEST_CASE("logprobs: chat's content list, the legacy parallel arrays, null when not asked", "[gateway][response]") {
  using tollgate::backends::TokenLogprob;
  // "é" split over two tokens: their texts show U+FFFD, their bytes are exact.
  std::vector<TokenLogprob> first = {{{"Hi", "Hi", -0.25}, {{"Hi", "Hi", -0.25}, {"Yo", "Yo", -1.5}}},
                                     {{"\xEF\xBF\xBD", "\xC3", -0.5}, {}}};
  std::vector<TokenLogprob> second = {{{"\xEF\xBF\xBD", "\xA9", -0.125}, {}}};

  CompletionFormatter chat(true, "m", false, true);
  auto c1 = only_choice(event_json(chat.delta_event("Hi", first)));
  const auto& content = c1.at("logprobs").at("content").as_array();
  REQUIRE(content.size() == 2);
  CHECK(content[0].at("token") == "Hi");
  CHECK(content[0].at("logprob").as_double() == -0.25);
  CHECK(content[0].at("bytes") == json::array{72, 105});
  const auto& top = content[0].at("top_logprobs").as_array();
  REQUIRE(top.size() == 2);
  CHECK(top[1].at("token") == "Yo");
  CHECK(top[1].at("logprob").as_double() == -1.5);
  CHECK(top[1].at("bytes") == json::array{89, 111});
  CHECK(content[1].at("bytes") == json::array{0xC3});
  CHECK(content[1].at("top_logprobs").as_array().empty());
  CHECK(c1.at("logprobs").at("refusal").is_null());
  auto c2 = only_choice(event_json(chat.delta_event("\xC3\xA9", second)));
  CHECK(c2.at("logprobs").at("content").as_array().at(0).at("bytes") == json::array{0xA9});
  CHECK(only_choice(event_json(chat.finish_event("stop"))).at("logprobs").is_null());
  auto whole = json::parse(chat.full_response("Hi\xC3\xA9", "stop", Usage{1, 3, false}, first)).as_object();
  CHECK(only_choice(whole).at("logprobs").at("content").as_array().size() == 2);

  CompletionFormatter legacy(false, "m", false, true);
  auto l1 = only_choice(event_json(legacy.delta_event("Hi", first)));
  const auto& lp = l1.at("logprobs").as_object();
  CHECK(lp.at("tokens") == json::array{"Hi", "\xEF\xBF\xBD"});
  CHECK(lp.at("token_logprobs") == json::array{-0.25, -0.5});
  CHECK(lp.at("top_logprobs").at(0) == json::object{{"Hi", -0.25}, {"Yo", -1.5}});
  CHECK(lp.at("top_logprobs").at(1) == json::object{{"\xEF\xBF\xBD", -0.5}});  // the chosen token is always there
  CHECK(lp.at("text_offset") == json::array{0, 2});
  auto l2 = only_choice(event_json(legacy.delta_event("\xC3\xA9", second)));
  CHECK(l2.at("logprobs").at("text_offset") == json::array{3});  // offsets run on across chunks

  CompletionFormatter not_asked(true, "m", false);
  CHECK(only_choice(event_json(not_asked.delta_event("Hi", first))).at("logprobs").is_null());
  CHECK(only_choice(json::parse(not_asked.full_response("Hi", "stop", Usage{}, first)).as_object())
            .at("logprobs")
            .is_null());
}

TEST_CASE("a backend's tool calls join the chat delta and the message", "[gateway][response]") {
  const std::string call = R"({"tool_calls":[{"index":0,"id":"c1","type":"function",)"
                           R"("function":{"name":"get_weather","arguments":""}}]})";
  CompletionFormatter chat(true, "m", false);
  auto first = only_choice(event_json(chat.delta_event("", {}, call)));
  CHECK(first.at("delta").at("role") == "assistant");
  CHECK_FALSE(first.at("delta").as_object().contains("content"));  // only a tool call's piece
  CHECK(first.at("delta").at("tool_calls").at(0).at("function").at("name") == "get_weather");
  auto text = only_choice(event_json(chat.delta_event("hi", {}, {})));
  CHECK(text.at("delta").at("content") == "hi");

  auto whole = json::parse(chat.full_response("", "tool_calls", Usage{}, {}, call)).as_object();
  const auto& message = only_choice(whole).at("message").as_object();
  CHECK(message.at("content").is_null());
  CHECK(message.at("tool_calls").at(0).at("id") == "c1");
  CHECK(only_choice(whole).at("finish_reason") == "tool_calls");
  // Extra fields never replace the gateway's own role and content.
  auto odd = json::parse(chat.full_response("text", "stop", Usage{}, {}, R"({"role":"x","content":"y","refusal":"no"})"))
                 .as_object();
  CHECK(only_choice(odd).at("message").at("role") == "assistant");
  CHECK(only_choice(odd).at("message").at("content") == "text");
  CHECK(only_choice(odd).at("message").at("refusal") == "no");
}

TEST_CASE("usage details appear only where the producer gave them", "[gateway][response]") {
  CompletionFormatter chat(true, "m", true);
  auto plain = json::parse(chat.full_response("x", "stop", Usage{3, 2})).as_object();
  CHECK_FALSE(plain.at("usage").as_object().contains("prompt_tokens_details"));
  CHECK_FALSE(plain.at("usage").as_object().contains("completion_tokens_details"));
  Usage detailed{30, 20};
  detailed.cached_tokens = 16;
  detailed.reasoning_tokens = 12;
  auto full = json::parse(chat.full_response("x", "stop", detailed)).as_object();
  CHECK(full.at("usage").at("prompt_tokens_details").at("cached_tokens") == 16);
  CHECK(full.at("usage").at("completion_tokens_details").at("reasoning_tokens") == 12);
  auto event = event_json(chat.usage_event(detailed));
  CHECK(event.at("usage").at("prompt_tokens_details").at("cached_tokens") == 16);
}
