#include "local_engine/engine.hpp"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "local_engine/gguf.hpp"
#include "engine_support.hpp"
#include "reference.hpp"

namespace le = tollgate::local_engine;
using tollgate::test::Collector;
using tollgate::test::reference_ids;
using tollgate::test::shared_model;

namespace {

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

TEST_CASE("a cancelled request leaves at once and frees its blocks, the engine refuses what it cannot take") {
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

  SECTION("the token that ends generation reports its logprobs too, one per counted token") {
    // Sampled stories end by themselves sooner or later; the first seed that
    // ends one is checked (a bounded search: none ending fails the test).
    bool ended = false;
    for (std::uint64_t seed = 1; seed <= 40 && !ended; ++seed) {
      auto r = greedy(tokenizer, "Once upon a time", 300);
      r.sampling.temperature = 1.0f;
      r.sampling.seed = seed;
      r.logprobs = 0;
      Collector c;
      const auto& done = run(r, c);
      if (done.finish_reason != "stop") continue;
      ended = true;
      INFO("seed " << seed);
      REQUIRE(c.logprobs.size() == done.tokens.size());
      CHECK(c.logprobs.back().chosen.id == done.tokens.back());
    }
    CHECK(ended);
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

namespace {

// A small llama GGUF whose matrices use every block type the loader converts
// (`converted`), or the same values as Q8_0, quantised by the writer.
void write_block_type_llama(const std::string& path, bool converted) {
  namespace gguf = le::gguf;
  using gguf::BlockType;
  using gguf::Value;
  gguf::Writer w;
  w.add("general.architecture", Value::string("llama"));
  w.add("llama.context_length", Value::u32(64));
  w.add("llama.embedding_length", Value::u32(256));
  w.add("llama.feed_forward_length", Value::u32(512));
  w.add("llama.block_count", Value::u32(2));
  w.add("llama.attention.head_count", Value::u32(4));
  w.add("llama.attention.head_count_kv", Value::u32(2));
  w.add("llama.rope.freq_base", Value::f32(10000.0f));
  w.add("llama.attention.layer_norm_rms_epsilon", Value::f32(1e-5f));
  w.add("tokenizer.ggml.model", Value::string("llama"));
  w.add("tokenizer.ggml.tokens", Value::strings({"<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"}));
  w.add("tokenizer.ggml.scores", Value::floats({0, 0, 0, -1, -2, -3, -4, -5}));
  w.add("tokenizer.ggml.token_type", Value::int32s({2, 3, 3, 1, 1, 1, 1, 1}));
  w.add("tokenizer.ggml.bos_token_id", Value::u32(1));
  w.add("tokenizer.ggml.eos_token_id", Value::u32(2));

  std::mt19937 random(11);
  // Random blocks with their fp16 scales set so values stay near +-0.1.
  auto blocks = [&](BlockType type, std::int64_t rows, std::int64_t cols) {
    const auto& l = gguf::layout(type);
    const auto count = static_cast<std::size_t>(rows * cols / l.values);
    std::vector<std::byte> data(count * l.bytes);
    for (auto& b : data) b = static_cast<std::byte>(random() & 0xFF);
    auto half = [&](std::size_t at, float value) {
      auto h = le::f32_to_fp16(value);
      std::memcpy(data.data() + at, &h, 2);
    };
    for (std::size_t i = 0; i < count; ++i) {
      const std::size_t at = i * l.bytes;
      const float jitter = 1.0f + static_cast<float>(i % 7) / 7.0f;
      switch (type) {
        case BlockType::q4_1:
          half(at, 0.01f * jitter);
          half(at + 2, -0.07f);
          break;
        case BlockType::q5_0:
          half(at, 0.008f * jitter);
          break;
        case BlockType::q5_1:
          half(at, 0.005f * jitter);
          half(at + 2, -0.08f);
          break;
        case BlockType::q4_k:
        case BlockType::q5_k:
          half(at, 0.0002f * jitter);
          half(at + 2, 0.0002f);
          break;
        case BlockType::q6_k:
          half(at + 208, 0.00003f * jitter);
          break;
      }
    }
    return data;
  };
  std::vector<std::vector<float>> values;  // per tensor, for the Q8_0 twin
  std::vector<std::size_t> columns;        // per tensor
  auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols, BlockType type) {
    auto data = blocks(type, rows, cols);
    columns.push_back(static_cast<std::size_t>(cols));
    if (converted) {
      w.add_tensor_blocks(name, {cols, rows}, type, data);
      values.emplace_back();
      return;
    }
    std::vector<float> decoded(static_cast<std::size_t>(rows * cols));
    const std::size_t row_bytes = static_cast<std::size_t>(cols / gguf::layout(type).values) * gguf::layout(type).bytes;
    for (std::int64_t r = 0; r < rows; ++r) {
      gguf::dequantize_blocks(type, data.data() + static_cast<std::size_t>(r) * row_bytes, cols,
                              decoded.data() + static_cast<std::size_t>(r * cols));
    }
    w.add_tensor(name, {cols, rows}, le::DType::q8_0);
    values.push_back(std::move(decoded));
  };
  auto norm = [&](const std::string& name) {
    w.add_tensor(name, {256}, le::DType::f32);
    values.push_back(std::vector<float>(256, 1.0f));
    columns.push_back(256);
  };
  matrix("token_embd.weight", 8, 256, BlockType::q6_k);
  norm("output_norm.weight");
  matrix("output.weight", 8, 256, BlockType::q4_k);
  for (int l = 0; l < 2; ++l) {
    std::string b = "blk." + std::to_string(l) + ".";
    norm(b + "attn_norm.weight");
    matrix(b + "attn_q.weight", 256, 256, BlockType::q4_k);
    matrix(b + "attn_k.weight", 128, 256, BlockType::q5_k);
    matrix(b + "attn_v.weight", 128, 256, BlockType::q6_k);
    matrix(b + "attn_output.weight", 256, 256, BlockType::q4_1);
    norm(b + "ffn_norm.weight");
    matrix(b + "ffn_gate.weight", 512, 256, BlockType::q5_0);
    matrix(b + "ffn_down.weight", 256, 512, BlockType::q5_1);
    matrix(b + "ffn_up.weight", 512, 256, BlockType::q4_k);
  }
  w.write(path, [&](std::size_t t, std::int64_t row, float* out) {
    const auto cols = static_cast<std::int64_t>(columns[t]);
    std::copy_n(values[t].begin() + row * cols, cols, out);
  });
}

}  // namespace

TEST_CASE("a model of K-quant and other block types runs as its Q8_0 conversion does") {
  auto dir = std::filesystem::temp_directory_path() / ("tollgate-blocks-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto blocks_path = (dir / "blocks.gguf").string();
  const auto q8_path = (dir / "q8.gguf").string();
  write_block_type_llama(blocks_path, true);
  write_block_type_llama(q8_path, false);

  auto generate = [](le::Model model) {
    CHECK(model.token_embedding.type == le::DType::q8_0);
    CHECK(model.layers[1].w_down.type == le::DType::q8_0);
    le::Engine engine(std::move(model), {}, le::make_cpu_device());
    le::GenerationRequest r;
    r.prompt = {1, 3, 4, 5};
    r.sampling.temperature = 0;
    r.max_tokens = 24;
    r.logprobs = 2;
    Collector c;
    REQUIRE(engine.submit(std::move(r), c.callback()).refusal == le::Engine::Refusal::none);
    const auto& done = c.wait();
    REQUIRE(done.type == le::GenerationEvent::Type::done);
    std::vector<float> logprobs;
    for (const auto& lp : c.logprobs) logprobs.push_back(lp.chosen.logprob);
    return std::pair{done.tokens, logprobs};
  };
  auto blocks = le::load_model(blocks_path);
  CHECK(blocks.file_type == "mostly Q4_K");
  auto info = le::describe_model_file(blocks_path);
  CHECK(info.find("engine: supported") != std::string::npos);
  for (const char* type : {"Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}) {
    CHECK(info.find(std::string("  ") + type + "\n") != std::string::npos);
  }
  auto [block_tokens, block_logprobs] = generate(std::move(blocks));
  auto [q8_tokens, q8_logprobs] = generate(le::load_model(q8_path));
  // The same Q8_0 weights either way, so the same computation, bit for bit.
  CHECK(block_tokens == q8_tokens);
  CHECK(block_logprobs == q8_logprobs);
  CHECK(block_tokens.size() == 24);
  std::filesystem::remove_all(dir);
}

TEST_CASE("prefix caching: prompts that begin alike share KV blocks and generate exactly what they do without") {
  const std::string story =
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
      "friends. One day, ";
  const std::vector<std::string> prompts = {story + "she saw a big dog", story + "it started to rain", story,
                                            story + "her mom said", "The cat sat", story + "she saw a big dog"};
  auto run_all = [&](le::EngineConfig config, bool together) {
    le::Engine engine(stories(), config, le::make_cpu_device());
    std::vector<std::vector<std::int32_t>> out(prompts.size());
    std::vector<Collector> collectors(prompts.size());
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      engine.submit(greedy(engine.tokenizer(), prompts[i], 60), collectors[i].callback());
      if (!together) out[i] = collectors[i].wait().tokens;
    }
    for (std::size_t i = 0; i < prompts.size(); ++i) out[i] = collectors[i].wait().tokens;
    return std::pair{out, engine.stats()};
  };
  le::EngineConfig off;
  off.prefix_caching = false;
  const auto [expected, off_stats] = run_all(off, false);
  CHECK(off_stats.prefix_cache_hits == 0);

  le::EngineConfig on;
  on.block_size = 16;
  SECTION("one after another: later prompts find the first one's blocks") {
    auto [got, stats] = run_all(on, false);
    CHECK(got == expected);
    CHECK(stats.prefix_cache_hits >= 4 * 16);  // each later story prompt shares at least its first block
    CHECK(stats.prefix_cache_queries > stats.prefix_cache_hits);
  }
  SECTION("all at once") {
    auto [got, stats] = run_all(on, true);
    CHECK(got == expected);
  }
  SECTION("all at once in a KV cache too small for them: preempted requests find their own blocks again") {
    auto model = stories();
    const auto& p = model.params;
    on.max_model_len = 128;
    on.kv_cache_bytes = 16 * le::KvCache::block_bytes(p.n_layers, 16, p.n_kv_heads * p.head_dim());
    on.max_num_batched_tokens = 32;
    auto [got, stats] = run_all(on, true);
    CHECK(got == expected);
    CHECK(stats.num_preemptions > 0);
  }
}
