#include "local_engine/engine.hpp"

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>

#include "reference.hpp"

namespace le = tollgate::local_engine;
using tollgate::test::reference_ids;
using tollgate::test::shared_model;

namespace {

// Collects one request's events and waits (bounded) for its end.
struct Collector {
  std::mutex mutex;
  std::condition_variable cv;
  std::string text;
  std::vector<std::string> pieces;
  std::vector<le::TokenLogprobs> logprobs;
  std::optional<le::GenerationEvent> last;

  le::GenerationCallback callback() {
    return [this](le::GenerationEvent e) {
      std::lock_guard lock(mutex);
      if (e.type == le::GenerationEvent::Type::text) {
        text += e.text;
        pieces.push_back(e.text);
        logprobs.insert(logprobs.end(), e.logprobs.begin(), e.logprobs.end());
        return;
      }
      REQUIRE_FALSE(last.has_value());  // exactly one final event
      last = std::move(e);
      cv.notify_all();
    };
  }
  const le::GenerationEvent& wait() {
    std::unique_lock lock(mutex);
    REQUIRE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return last.has_value(); }));
    return *last;
  }
};

le::Model stories() { return le::load_model(shared_model("stories260K.bin"), shared_model("tok512.bin")); }

le::GenerationRequest greedy(const le::Tokenizer& tokenizer, const std::string& prompt, std::int64_t max_tokens) {
  le::GenerationRequest r;
  r.prompt = tokenizer.encode(prompt, true);
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  return r;
}

// The reference ids of a run: prompt (after BOS), then generated.
std::vector<std::int32_t> run_ids(const le::GenerationRequest& r, const le::GenerationEvent& done) {
  std::vector<std::int32_t> ids(r.prompt.begin() + 1, r.prompt.end());
  ids.insert(ids.end(), done.tokens.begin(), done.tokens.end());
  return ids;
}

}  // namespace

TEST_CASE("greedy generation reproduces the stories260K reference, token for token") {
  le::Engine engine(stories(), {}, le::make_cpu_device());
  for (auto [prompt, name] :
       {std::pair{"", "stories260K-no-prompt-t0-n256"}, {"The cat", "stories260K-The_cat-t0-n256"}}) {
    INFO(name);
    auto expected = reference_ids(std::string(name) + ".ids");
    auto request = greedy(engine.tokenizer(), prompt, 256);
    auto copy = request;
    Collector c;
    REQUIRE(engine.submit(std::move(request), c.callback()).refusal == le::Engine::Refusal::none);
    const auto& done = c.wait();
    REQUIRE(done.type == le::GenerationEvent::Type::done);
    auto ids = run_ids(copy, done);
    // The reference stops at the step limit or when the model emits BOS (which it does not list).
    if (!ids.empty() && ids.back() == 1) ids.pop_back();
    CHECK(ids == std::vector<std::int32_t>(expected.begin(), expected.begin() + std::min(expected.size(), ids.size())));
    CHECK(ids.size() == expected.size());
    auto reference_text = tollgate::test::trim_right(
        tollgate::test::read_text_file(shared_model("reference/" + std::string(name) + ".txt")));
    CHECK(tollgate::test::trim_right(std::string(prompt) + c.text) == reference_text);
  }
}

TEST_CASE("greedy output is the same alone and among 16 concurrent requests, with preemption") {
  const std::vector<std::string> prompts = {
      "",     "The cat", "Once upon a time", "Lily", "The dog", "Tom and",  "A big",    "She saw",
      "They", "One day", "The sun",          "Ben",  "It was",  "The bird", "Mom said", "The little"};
  // Alone, one at a time.
  std::vector<std::vector<std::int32_t>> alone;
  {
    le::Engine engine(stories(), {}, le::make_cpu_device());
    for (const auto& p : prompts) {
      Collector c;
      engine.submit(greedy(engine.tokenizer(), p, 120), c.callback());
      alone.push_back(c.wait().tokens);
    }
  }
  // All at once on `engine`: each must get what it got alone.
  const auto all_at_once = [&](le::Engine& engine) {
    std::vector<Collector> collectors(prompts.size());
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      engine.submit(greedy(engine.tokenizer(), prompts[i], 120), collectors[i].callback());
    }
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      INFO(prompts[i]);
      CHECK(collectors[i].wait().tokens == alone[i]);
    }
  };
  SECTION("16 at once, plenty of KV blocks") {
    le::Engine engine(stories(), {}, le::make_cpu_device());
    all_at_once(engine);
  }
  SECTION("16 at once with a KV cache too small for all: requests are preempted and recomputed") {
    auto model = stories();
    const auto& p = model.params;
    le::EngineConfig config;
    config.block_size = 16;
    // 40 blocks of 16 tokens: 640 slots for 16 sequences of up to ~125 tokens.
    config.kv_cache_bytes = 40 * le::KvCache::block_bytes(p.n_layers, 16, p.n_kv_heads * p.head_dim());
    config.max_num_batched_tokens = 64;  // prompts arrive in chunks too
    le::Engine engine(std::move(model), config, le::make_cpu_device());
    all_at_once(engine);
    CHECK(engine.stats().num_preemptions > 0);
  }
}

TEST_CASE("the same seed gives the same sampled output, another seed another") {
  le::Engine engine(stories(), {}, le::make_cpu_device());
  auto sampled = [&](std::uint64_t seed) {
    auto r = greedy(engine.tokenizer(), "Once upon a time", 60);
    r.sampling.temperature = 1.0f;
    r.sampling.top_p = 0.9f;
    r.sampling.seed = seed;
    Collector c;
    engine.submit(std::move(r), c.callback());
    return c.wait().tokens;
  };
  auto a = sampled(7);
  CHECK(sampled(7) == a);
  CHECK(sampled(8) != a);
}

TEST_CASE("max_tokens ends with length, a stop sequence with stop and without its text") {
  le::Engine engine(stories(), {}, le::make_cpu_device());
  {
    Collector c;
    engine.submit(greedy(engine.tokenizer(), "", 10), c.callback());
    const auto& done = c.wait();
    CHECK(done.finish_reason == "length");
    CHECK(done.completion_tokens == 10);
    CHECK(done.prompt_tokens == 1);
  }
  {
    // The reference text: "Once upon a time, there was a little girl named Lily. ..."
    auto r = greedy(engine.tokenizer(), "", 100);
    r.stop = {"little girl"};
    Collector c;
    engine.submit(std::move(r), c.callback());
    const auto& done = c.wait();
    CHECK(done.finish_reason == "stop");
    CHECK(c.text == "Once upon a time, there was a ");
  }
}

TEST_CASE("a cancelled request leaves at once and frees its blocks; the engine refuses what it cannot take") {
  le::EngineConfig config;
  config.max_waiting = 2;
  config.max_num_seqs = 1;
  le::Engine engine(stories(), config, le::make_cpu_device());
  Collector first;
  auto id = engine.submit(greedy(engine.tokenizer(), "", 0), first.callback()).id;
  // Wait until it produces something, then cancel.
  for (int i = 0; i < 500 && engine.stats().running == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  engine.cancel(id);
  for (int i = 0; i < 500 && engine.stats().kv_cache_usage > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  CHECK(engine.stats().kv_cache_usage == 0);
  CHECK(engine.stats().running == 0);

  // One running, two waiting: the next is refused as overloaded.
  Collector a, b, c;
  REQUIRE(engine.submit(greedy(engine.tokenizer(), "", 0), a.callback()).refusal == le::Engine::Refusal::none);
  for (int i = 0; i < 500 && engine.stats().running == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  REQUIRE(engine.submit(greedy(engine.tokenizer(), "", 5), b.callback()).refusal == le::Engine::Refusal::none);
  REQUIRE(engine.submit(greedy(engine.tokenizer(), "", 5), c.callback()).refusal == le::Engine::Refusal::none);
  CHECK(engine.submit(greedy(engine.tokenizer(), "", 5), [](le::GenerationEvent) {}).refusal ==
        le::Engine::Refusal::overloaded);
  CHECK(a.wait().type == le::GenerationEvent::Type::done);
  CHECK(b.wait().completion_tokens == 5);
  CHECK(c.wait().completion_tokens == 5);

  auto too_long = greedy(engine.tokenizer(), std::string(3000, 'a'), 1);
  CHECK(engine.submit(std::move(too_long), [](le::GenerationEvent) {}).refusal == le::Engine::Refusal::too_long);
  le::GenerationRequest empty;
  CHECK(engine.submit(std::move(empty), [](le::GenerationEvent) {}).refusal == le::Engine::Refusal::invalid);
}

TEST_CASE("logprobs ride with the text they produced: the chosen token and the likeliest alternatives") {
  le::Engine engine(stories(), {}, le::make_cpu_device());
  const auto& tokenizer = engine.tokenizer();
  auto run = [&](le::GenerationRequest r, Collector& c) -> const le::GenerationEvent& {
    REQUIRE(engine.submit(std::move(r), c.callback()).refusal == le::Engine::Refusal::none);
    const auto& done = c.wait();
    REQUIRE(done.type == le::GenerationEvent::Type::done);
    return done;
  };

  SECTION("greedy: the chosen token is the likeliest, and the tokens spell the text") {
    auto r = greedy(tokenizer, "The cat", 40);
    r.logprobs = 3;
    Collector c;
    const auto& done = run(r, c);
    REQUIRE(done.finish_reason == "length");
    REQUIRE(c.logprobs.size() == done.tokens.size());
    std::string spelled;
    for (std::size_t i = 0; i < c.logprobs.size(); ++i) {
      const auto& lp = c.logprobs[i];
      INFO("token " << i);
      CHECK(lp.chosen.id == done.tokens[i]);
      REQUIRE(lp.top.size() == 3);
      CHECK(lp.top[0].id == lp.chosen.id);
      CHECK(lp.top[0].logprob == lp.chosen.logprob);
      CHECK(lp.chosen.logprob <= 0.0f);
      CHECK(lp.top[0].logprob >= lp.top[1].logprob);
      CHECK(lp.top[1].logprob >= lp.top[2].logprob);
      CHECK(lp.top[1].id != lp.top[0].id);
      spelled += tokenizer.token_bytes(lp.chosen.id);
    }
    CHECK(spelled == c.text);
    // Asking for logprobs changes nothing in what is generated.
    Collector plain;
    auto without = greedy(tokenizer, "The cat", 40);
    CHECK(run(without, plain).tokens == done.tokens);
    CHECK(plain.logprobs.empty());
  }

  SECTION("sampled: logprobs are the model's, so the chosen token may be less likely than the best") {
    auto r = greedy(tokenizer, "Once upon a time", 60);
    r.sampling.temperature = 1.5f;
    r.sampling.seed = 7;
    r.logprobs = 1;
    Collector c;
    const auto& done = run(r, c);
    REQUIRE(c.logprobs.size() == done.tokens.size());
    bool less_likely = false;
    for (const auto& lp : c.logprobs) {
      REQUIRE(lp.top.size() == 1);
      CHECK(lp.chosen.logprob <= lp.top[0].logprob);
      less_likely = less_likely || lp.chosen.id != lp.top[0].id;
    }
    CHECK(less_likely);
  }

  SECTION("a stop sequence: tokens that only made the stop text report nothing") {
    auto probe = greedy(tokenizer, "The cat", 40);
    Collector first;
    auto whole = run(probe, first).tokens;
    auto text = first.text;
    // Stop at the second word boundary of the reference text.
    auto at = text.find(' ', text.find(' ', 1) + 1);
    REQUIRE(at != std::string::npos);
    auto r = greedy(tokenizer, "The cat", 40);
    r.stop = {text.substr(at, 3)};
    r.logprobs = 0;
    Collector c;
    const auto& done = run(r, c);
    CHECK(done.finish_reason == "stop");
    CHECK(c.text == text.substr(0, at));
    std::string spelled;
    for (const auto& lp : c.logprobs) spelled += tokenizer.token_bytes(lp.chosen.id);
    CHECK(spelled.substr(0, c.text.size()) == c.text);
    CHECK(spelled.size() < c.text.size() + 3);
    CHECK(c.logprobs.size() <= done.tokens.size());
  }
}
