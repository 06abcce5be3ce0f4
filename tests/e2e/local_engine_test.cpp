// The in-process engine (`type: local`) through the real binary: reference
// outputs over HTTP, concurrent streams, chat, metering, cancellation,
// overload, the CLI, and the embedded default's demo model.
#include <catch2/catch.hpp>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <latch>
#include <regex>
#include <thread>

#include "harness.hpp"
#include "tests/local_engine/reference.hpp"
#include "upstream.hpp"

using namespace tollgate::test;
namespace json = boost::json;

namespace {

std::string stories_config(const std::string& extra = "") {
  return "metering: {flush_interval: 100ms}\n"
         "backends:\n"
         "  - {name: local, type: local, path: " +
         shared_model("stories260K.bin") + ", tokenizer: " + shared_model("tok512.bin") + extra +
         "}\n"
         "models:\n"
         "  - name: stories\n"
         "    deployments: [{backend: local}]\n";
}

GatewayProcess::Options gateway_options(std::string yaml) {
  GatewayProcess::Options o;
  o.config_yaml = std::move(yaml);
  return o;
}

std::string completion_body(const std::string& prompt, int max_tokens, bool stream) {
  json::object o{{"model", "stories"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
  if (stream) {
    o["stream"] = true;
    o["stream_options"] = json::object{{"include_usage", true}};
  }
  return json::serialize(o);
}

struct Streamed {
  std::string text;
  std::size_t chunks = 0;
  std::string finish_reason;
  std::int64_t completion_tokens = -1;
  bool done = false;
};

Streamed parse_sse(const std::string& body) {
  Streamed s;
  std::size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    auto end = body.find("\n\n", pos);
    auto data = body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") {
      s.done = true;
      continue;
    }
    auto event = json::parse(data).as_object();
    if (auto* u = event.if_contains("usage"); u && u->is_object()) {
      s.completion_tokens = u->at("completion_tokens").as_int64();
    }
    for (const auto& c : event.at("choices").as_array()) {
      s.text += c.at("text").as_string();
      ++s.chunks;
      if (!c.at("finish_reason").is_null()) s.finish_reason = c.at("finish_reason").as_string();
    }
  }
  return s;
}

std::optional<double> metric(std::uint16_t port, const std::string& series) {
  HttpClient client(port);
  auto body = client.get("/metrics").body;
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return std::nullopt;
}

}  // namespace

TEST_CASE("POST /v1/completions reproduces the stories260K reference", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);
  for (auto [prompt, name] :
       {std::pair{"", "stories260K-no-prompt-t0-n256"}, {"The cat", "stories260K-The_cat-t0-n256"}}) {
    INFO(name);
    auto r = client.post("/v1/completions", key, completion_body(prompt, 256, false));
    REQUIRE(r.status == 200);
    auto body = r.json().as_object();
    auto& choice = body.at("choices").as_array().at(0).as_object();
    auto expected = trim_right(read_text_file(shared_model("reference/" + std::string(name) + ".txt")));
    CHECK(trim_right(std::string(prompt) + std::string(choice.at("text").as_string())) == expected);
    auto ids = reference_ids(std::string(name) + ".ids");
    auto prompt_after_bos = std::string(prompt).empty() ? 0 : 3;  // "The cat": ▁The ▁c at
    CHECK(body.at("usage").at("prompt_tokens") == prompt_after_bos + 1);
    // The reference lists generated ids up to (not including) a generated BOS.
    auto generated = body.at("usage").at("completion_tokens").as_int64();
    CHECK((generated == static_cast<std::int64_t>(ids.size()) - prompt_after_bos ||
           generated == static_cast<std::int64_t>(ids.size()) - prompt_after_bos + 1));
  }
  // The usage rows hold the engine's own counts.
  gw.stop(SIGTERM);
  CHECK(count_usage_rows(gw.db(), "model = 'stories' AND status = 200 AND estimated = 0 AND completion_tokens > 200") ==
        2);
}

TEST_CASE("16 concurrent streamed requests each get exactly what they get alone", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  const std::vector<std::string> prompts = {
      "",     "The cat", "Once upon a time", "Lily", "The dog", "Tom and",  "A big",    "She saw",
      "They", "One day", "The sun",          "Ben",  "It was",  "The bird", "Mom said", "The little"};
  std::vector<std::string> alone;
  {
    HttpClient client(gw.port(), 60s);
    for (const auto& p : prompts) {
      auto r = client.post("/v1/completions", key, completion_body(p, 100, false));
      REQUIRE(r.status == 200);
      alone.emplace_back(r.json().at("choices").at(0).at("text").as_string());
    }
  }
  std::vector<Streamed> streamed(prompts.size());
  std::vector<int> statuses(prompts.size());
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      HttpClient client(gw.port(), 60s);
      auto r = client.post("/v1/completions", key, completion_body(prompts[i], 100, true));
      statuses[i] = r.status;
      streamed[i] = parse_sse(r.body);
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt '" << prompts[i] << "'");
    CHECK(statuses[i] == 200);
    CHECK(streamed[i].done);
    CHECK(streamed[i].text == alone[i]);
    CHECK(streamed[i].chunks > 10);  // token by token, not one blob
    CHECK(streamed[i].completion_tokens > 0);
  }
}

TEST_CASE("chat completions, stop sequences and sampling parameters reach the engine", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);

  auto chat = client.post("/v1/chat/completions", key,
                          R"({"model":"stories","messages":[{"role":"user","content":"Tell me a story"}],)"
                          R"("max_tokens":20,"temperature":0})");
  REQUIRE(chat.status == 200);
  CHECK(chat.json().at("choices").at(0).at("message").at("content").as_string().size() > 0);
  CHECK(chat.json().at("usage").at("completion_tokens") == 20);
  CHECK(chat.json().at("choices").at(0).at("finish_reason") == "length");

  auto stopped =
      client.post("/v1/completions", key,
                  R"({"model":"stories","prompt":"","max_tokens":100,"temperature":0,"stop":["little girl"]})");
  REQUIRE(stopped.status == 200);
  CHECK(stopped.json().at("choices").at(0).at("text") == "Once upon a time, there was a ");
  CHECK(stopped.json().at("choices").at(0).at("finish_reason") == "stop");

  auto seeded = [&](int seed) {
    auto r = client.post(
        "/v1/completions", key,
        R"({"model":"stories","prompt":"Once","max_tokens":40,"temperature":1.0,"top_k":40,"top_p":0.9,"seed":)" +
            std::to_string(seed) + "}");
    REQUIRE(r.status == 200);
    return std::string(r.json().at("choices").at(0).at("text").as_string());
  };
  CHECK(seeded(5) == seeded(5));
  CHECK(seeded(5) != seeded(6));

  auto too_long = client.post("/v1/completions", key, completion_body(std::string(4000, 'x'), 10, false));
  CHECK(too_long.status == 400);
  CHECK(too_long.json().at("error").at("message").as_string().find("context length") != std::string::npos);
  CHECK(too_long.json().at("error").at("code") == "context_length_exceeded");
  CHECK(too_long.json().at("error").at("param") == "prompt");
}

TEST_CASE("logprobs from the engine: chat and legacy, whole and streamed, spelling the text",
          "[e2e][local][logprobs]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);

  auto chat = client.post("/v1/chat/completions", key,
                          R"({"model":"stories","messages":[{"role":"user","content":"Tell me a story"}],)"
                          R"("max_tokens":20,"temperature":0,"logprobs":true,"top_logprobs":3})");
  REQUIRE(chat.status == 200);
  auto body = chat.json();
  const auto& choice = body.at("choices").at(0);
  auto content = choice.at("logprobs").at("content").as_array();
  REQUIRE(content.size() == 20);  // one per generated token
  std::string spelled;
  for (const auto& t : content) {
    spelled += t.at("token").as_string();
    CHECK(t.at("logprob").to_number<double>() <= 0.0);
    const auto& top = t.at("top_logprobs").as_array();
    REQUIRE(top.size() == 3);
    CHECK(top[0].at("token") == t.at("token"));  // greedy took the likeliest
    CHECK(top[0].at("logprob").to_number<double>() >= top[1].at("logprob").to_number<double>());
    CHECK(t.at("bytes").as_array().size() == t.at("token").as_string().size());  // stories speaks ASCII
  }
  CHECK(spelled == choice.at("message").at("content").as_string());

  // Legacy, streamed: the tokens of each chunk spell its text, offsets run on.
  auto streamed = client.post(
      "/v1/completions", key,
      R"({"model":"stories","prompt":"Once upon","max_tokens":30,"temperature":0,"logprobs":2,"stream":true})");
  REQUIRE(streamed.status == 200);
  std::string text, tokens;
  std::int64_t offset = 0, entries = 0;
  for (const auto& data : sse_data(streamed.body)) {
    if (data == "[DONE]") continue;
    auto event = json::parse(data);
    const auto& c = event.at("choices").at(0).as_object();
    if (!c.at("finish_reason").is_null()) continue;
    text += c.at("text").as_string();
    const auto& lp = c.at("logprobs").as_object();
    for (std::size_t i = 0; i < lp.at("tokens").as_array().size(); ++i) {
      const auto& token = lp.at("tokens").at(i).as_string();
      CHECK(lp.at("text_offset").at(i) == offset);
      offset += static_cast<std::int64_t>(token.size());
      tokens += token;
      auto top = lp.at("top_logprobs").at(i).as_object();
      CHECK((top.size() == 2 || top.size() == 3));  // two likeliest, and the chosen one
      CHECK(top.contains(token));
      ++entries;
    }
  }
  CHECK(entries == 30);
  CHECK(tokens == text);
}

TEST_CASE("a repeated prompt is served from the prefix cache, with the same answer", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);
  const std::string prompt =
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.";
  auto first = client.post("/v1/completions", key, completion_body(prompt, 30, false));
  REQUIRE(first.status == 200);
  CHECK(metric(gw.port(), "tollgate_engine_prefix_cache_hits_total{backend=\"local\"}") == 0.0);
  CHECK(first.json().at("usage").at("prompt_tokens_details").at("cached_tokens") == 0);
  auto second = client.post("/v1/completions", key, completion_body(prompt, 30, false));
  REQUIRE(second.status == 200);
  // OpenAI's usage detail says how much of the prompt the cache served: whole blocks of 16.
  auto cached = second.json().at("usage").at("prompt_tokens_details").at("cached_tokens").as_int64();
  CHECK(cached >= 16);
  CHECK(cached % 16 == 0);
  CHECK(cached < second.json().at("usage").at("prompt_tokens").as_int64());
  CHECK(second.json().at("choices").at(0).at("text") == first.json().at("choices").at(0).at("text"));
  CHECK(metric(gw.port(), "tollgate_engine_prefix_cache_hits_total{backend=\"local\"}").value_or(0) >= 16);
  CHECK(metric(gw.port(), "tollgate_engine_prefix_cache_queries_total{backend=\"local\"}").value_or(0) >=
        2 * second.json().at("usage").at("prompt_tokens").as_int64());
}

TEST_CASE("a local model refuses content parts it cannot read", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);
  auto r = client.post("/v1/chat/completions", key,
                       R"({"model":"stories","messages":[{"role":"user","content":[{"type":"text","text":"hi"},)"
                       R"({"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]})");
  CHECK(r.status == 400);
  CHECK(r.json().at("error").at("type") == "invalid_request_error");
  CHECK(r.json().at("error").at("message").as_string().find("text only") != std::string::npos);
  // Text parts alone are fine.
  r = client.post(
      "/v1/chat/completions", key,
      R"({"model":"stories","max_tokens":3,"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]})");
  CHECK(r.status == 200);
}

// What the engine cannot do is refused with the reason, never ignored (a
// client needing a tool call or JSON must not get free text as if it had
// asked for it); logit_bias it applies.
TEST_CASE("a local model applies logit_bias and refuses tools, JSON formats, echo and suffix", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config()));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);

  // +100 on one token: every generated token is that one.
  auto forced = client.post("/v1/completions", key,
                            R"({"model":"stories","prompt":"Once upon a time","max_tokens":5,"temperature":0,)"
                            R"("logit_bias":{"300":100}})");
  REQUIRE(forced.status == 200);
  const std::string text(forced.json().at("choices").at(0).at("text").as_string());
  CHECK(forced.json().at("usage").at("completion_tokens") == 5);
  REQUIRE(!text.empty());
  REQUIRE(text.size() % 5 == 0);
  const auto piece = text.substr(0, text.size() / 5);
  CHECK(text == piece + piece + piece + piece + piece);
  // Without the bias the greedy answer is another: the bias, not the prompt, made it repeat.
  auto plain = client.post("/v1/completions", key,
                           R"({"model":"stories","prompt":"Once upon a time","max_tokens":5,"temperature":0})");
  REQUIRE(plain.status == 200);
  CHECK(plain.json().at("choices").at(0).at("text").as_string() != text);

  auto refused = [&](const std::string& route, const std::string& body, const std::string& says) {
    INFO(body);
    auto r = client.post(route, key, body);
    CHECK(r.status == 400);
    CHECK(r.json().at("error").at("type") == "invalid_request_error");
    CHECK(r.json().at("error").at("message").as_string().find(says) != std::string::npos);
  };
  const std::string msgs = R"("model":"stories","messages":[{"role":"user","content":"hi"}])";
  const std::string tool = R"("tools":[{"type":"function","function":{"name":"f","parameters":{}}}])";
  refused("/v1/chat/completions", "{" + msgs + "," + tool + "}", "tools");
  refused("/v1/chat/completions", "{" + msgs + "," + tool + R"(,"tool_choice":"required"})", "tools");
  refused("/v1/chat/completions", "{" + msgs + R"(,"response_format":{"type":"json_object"}})", "json_object");
  refused("/v1/completions", R"({"model":"stories","prompt":"hi","echo":true})", "echo");
  refused("/v1/completions", R"({"model":"stories","prompt":"hi","suffix":"The end."})", "suffix");
  refused("/v1/completions", R"({"model":"stories","prompt":"hi","logit_bias":{"100000":5}})", "no token 100000");
  // tool_choice none, response_format text and echo false are what it does anyway.
  auto fine = client.post(
      "/v1/chat/completions", key,
      "{" + msgs + "," + tool + R"(,"tool_choice":"none","response_format":{"type":"text"},)" + R"("max_tokens":3})");
  CHECK(fine.status == 200);
}

TEST_CASE("a client that disconnects mid-stream frees its sequence, a full queue answers 503", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir, gateway_options(stories_config(", max_num_seqs: 1, max_waiting: 1")));
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  {
    HttpClient client(gw.port());
    auto body = completion_body("", 100000, true);
    REQUIRE(client.send_raw(raw_post("/v1/completions", key, body)));
    std::string got;  // the head and the first event may come in separate reads
    for (int i = 0; i < 50 && got.find("data: ") == std::string::npos; ++i) got += client.read_some(100ms);
    REQUIRE(got.find("data: ") != std::string::npos);
  }  // closed mid-stream
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (metric(gw.port(), "tollgate_engine_kv_cache_usage_perc{backend=\"local\"}").value_or(1) != 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  CHECK(metric(gw.port(), "tollgate_engine_kv_cache_usage_perc{backend=\"local\"}") == 0.0);
  CHECK(metric(gw.port(), "tollgate_engine_num_requests_running{backend=\"local\"}") == 0.0);
  // Metered as a 499 with the engine's own count of what it produced, not an estimate.
  const std::string exact = "status = 499 AND estimated = 0 AND prompt_tokens = 1 AND completion_tokens > 0";
  while (count_usage_rows(gw.db(), exact) == 0 && std::chrono::steady_clock::now() < deadline + 5s) {
    std::this_thread::sleep_for(50ms);
  }
  CHECK(count_usage_rows(gw.db(), exact) == 1);

  // One running, one waiting: a third concurrent request is refused with 503 and Retry-After.
  // Connected first and sent together, so all six overlap the first one's generation.
  constexpr std::size_t kClients = 6;
  std::vector<std::unique_ptr<HttpClient>> clients;
  for (std::size_t i = 0; i < kClients; ++i) clients.push_back(std::make_unique<HttpClient>(gw.port(), 60s));
  std::vector<int> statuses(kClients);
  std::vector<std::string> retry_after(kClients);
  std::latch start(kClients);
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      auto r = clients[i]->post("/v1/completions", key, completion_body("", 400, false));
      statuses[i] = r.status;
      retry_after[i] = r.header("retry-after");
    });
  }
  for (auto& t : threads) t.join();
  auto ok = std::count(statuses.begin(), statuses.end(), 200);
  auto refused = std::count(statuses.begin(), statuses.end(), 503);
  INFO("ok " << ok << ", refused " << refused);
  CHECK(ok >= 2);
  CHECK(refused >= 1);
  CHECK(ok + refused == 6);
  for (std::size_t i = 0; i < statuses.size(); ++i) {
    if (statuses[i] == 503) CHECK(retry_after[i] == "1");
  }
  CHECK(metric(gw.port(), "tollgate_engine_generation_tokens_total{backend=\"local\"}").value_or(0) > 300);
}

TEST_CASE("tollgate generate prints the reference completion, model info describes the file", "[e2e][local]") {
  auto ids =
      run_tollgate({"generate", "--model", shared_model("stories260K.bin"), "--tokenizer", shared_model("tok512.bin"),
                    "--prompt", "The cat", "--temperature", "0", "--max-tokens", "300", "--ids"},
                   60s);
  REQUIRE(ids.exit_code == 0);
  auto expected = reference_ids("stories260K-The_cat-t0-n256.ids");
  std::string expected_line;
  for (auto id : expected) expected_line += std::to_string(id) + " ";
  // A generated BOS ends the run; the reference does not list it.
  auto line = trim_right(ids.out);
  if (line.size() >= 2 && line.substr(line.size() - 2) == " 1") line.resize(line.size() - 2);
  CHECK(line == trim_right(expected_line));

  auto text = run_tollgate(
      {"generate", "--model", shared_model("stories260K.gguf"), "--temperature", "0", "--max-tokens", "255"}, 60s);
  REQUIRE(text.exit_code == 0);
  CHECK(trim_right(text.out) == trim_right(read_text_file(shared_model("reference/stories260K-no-prompt-t0-n256.txt")))
                                    .substr(0, trim_right(text.out).size()));
  CHECK(text.out.starts_with("Once upon a time, there was a little girl named Lily."));
  CHECK(text.err.find("exceeds") != std::string::npos);  // past the file's 128-token context: a warning, not a refusal

  auto info = run_tollgate({"model", "info", shared_model("stories260K.gguf")});
  REQUIRE(info.exit_code == 0);
  CHECK(info.out.find("llama") != std::string::npos);
  CHECK(info.out.find("blk.4.ffn_down.weight") != std::string::npos);
  auto bad = run_tollgate({"model", "info", shared_model("README.md")});
  CHECK(bad.exit_code == 1);
  CHECK_FALSE(bad.err.empty());
}

TEST_CASE("the embedded default serves the demo model it writes itself", "[e2e][local]") {
  TempDir dir;
  GatewayProcess gw(dir);
  CHECK(std::filesystem::exists(dir.file("tollgate-demo.gguf")));
  CHECK(gw.log().find("demo model") != std::string::npos);
  auto key = create_key(gw.db(), "alice");
  wait_for_key(gw.port(), key);
  HttpClient client(gw.port(), 60s);
  auto models = client.get("/v1/models", key);
  CHECK(models.body.find("\"demo\"") != std::string::npos);
  auto r = client.post("/v1/chat/completions", key, chat_body("demo", "hello", R"("max_tokens":8)"));
  REQUIRE(r.status == 200);
  CHECK(r.json().at("usage").at("completion_tokens").as_int64() >= 1);
}

TEST_CASE("device: cuda-emulated serves through the gateway the CPU device's greedy completions, 16 at once",
          "[e2e][local][device]") {
  const std::vector<std::string> prompts = {"The cat", "Once upon a time", "Lily saw a big dog", "", "Tom and Sue",
                                            "One day, a little bird", "The sun", "She was happy",
                                            "Once upon a time, there was a little girl named Lily. She loved to play",
                                            "The dog ran", "Mom said", "A boy", "They went to the park", "The car",
                                            "It was a sunny day", "Ben"};
  auto run_all = [&](const std::string& device) {
    TempDir dir;
    GatewayProcess gw(dir, gateway_options(stories_config(", device: " + device + ", max_num_seqs: 16")));
    auto key = create_key(gw.db(), "alice");
    wait_for_key(gw.port(), key);
    std::vector<std::string> texts(prompts.size());
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      threads.emplace_back([&, i] {
        HttpClient client(gw.port(), 120s);
        auto r = client.post("/v1/completions", key, completion_body(prompts[i], 24, i % 2 == 0));
        if (r.status != 200) return;
        texts[i] = i % 2 == 0 ? parse_sse(r.body).text
                              : std::string(r.json().at("choices").at(0).at("text").as_string());
      });
    }
    for (auto& t : threads) t.join();
    auto info = metric(gw.port(), "tollgate_engine_generation_tokens_total{backend=\"local\"}");
    HttpClient client(gw.port());
    auto metrics = client.get("/metrics").body;
    CHECK(metrics.find("tollgate_engine_device_info{backend=\"local\",device=\"" + device) != std::string::npos);
    CHECK(gw.log().find("device: " + device) != std::string::npos);
    CHECK(info.value_or(0) >= 16);
    return texts;
  };
  auto cpu = run_all("cpu");
  auto emulated = run_all("cuda-emulated");
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt '" << prompts[i] << "'");
    CHECK_FALSE(cpu[i].empty());
    CHECK(emulated[i] == cpu[i]);
  }
}

TEST_CASE("tollgate generate --device: cuda-emulated prints the reference, cuda without a GPU says why",
          "[e2e][local][device]") {
  auto ids = run_tollgate({"generate", "--model", shared_model("stories260K.bin"), "--tokenizer",
                           shared_model("tok512.bin"), "--prompt", "The cat", "--temperature", "0", "--max-tokens",
                           "100", "--ids", "--device", "cuda-emulated"},
                          120s);
  REQUIRE(ids.exit_code == 0);
  auto expected = reference_ids("stories260K-The_cat-t0-n256.ids");
  std::string expected_line;
  for (std::size_t i = 0; i < 103 && i < expected.size(); ++i) expected_line += std::to_string(expected[i]) + " ";
  CHECK(trim_right(ids.out) == trim_right(expected_line));  // 3 prompt ids after BOS, then 100 generated
  CHECK(ids.err.find("on cuda-emulated") != std::string::npos);

  auto info = run_tollgate({"model", "info", shared_model("stories260K.gguf"), "--device", "cpu"});
  REQUIRE(info.exit_code == 0);
  CHECK(info.out.find("device: cpu") != std::string::npos);

  auto cuda = run_tollgate({"generate", "--model", shared_model("stories260K.gguf"), "--device", "cuda"});
  auto auto_info = run_tollgate({"model", "info", shared_model("stories260K.gguf")});
  REQUIRE(auto_info.exit_code == 0);
  if (auto_info.out.find("device: cuda (") != std::string::npos) {
    CHECK(cuda.exit_code == 0);  // a machine with a GPU
  } else {
    CHECK(auto_info.out.find("device: auto -> cpu (") != std::string::npos);  // and the reason
    CHECK(cuda.exit_code != 0);
    CHECK(cuda.err.find("device: cuda, but") != std::string::npos);
  }
}
