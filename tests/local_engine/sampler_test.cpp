#include "local_engine/sampler.hpp"

#include <catch2/catch.hpp>
#include <cmath>
#include <map>

namespace le = tollgate::local_engine;

namespace {

std::map<std::int32_t, int> histogram(le::SamplingParams p, std::vector<float> logits, int draws) {
  le::Sampler sampler(p, {});
  std::map<std::int32_t, int> counts;
  for (int i = 0; i < draws; ++i) {
    auto l = logits;
    ++counts[sampler.sample(l.data(), static_cast<std::int32_t>(l.size()))];
  }
  return counts;
}

}  // namespace

TEST_CASE("greedy takes the largest logit, the lowest id on ties") {
  le::SamplingParams p;
  p.temperature = 0;
  le::Sampler s(p, {});
  std::vector<float> l = {0.1f, 3.0f, -1.0f, 3.0f};
  CHECK(s.sample(l.data(), 4) == 1);
  // A vocabulary-sized row: ties in different lanes of the scan and in the
  // tail past the last whole group of eight; a NaN never wins.
  std::vector<float> big(1003);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>((i * 37) % 101) / 10.0f;
  big[5] = std::nanf("");
  big[1001] = 20.0f;
  CHECK(s.sample(big.data(), 1003) == 1001);
  big[613] = 20.0f;
  big[614] = 20.0f;
  CHECK(s.sample(big.data(), 1003) == 613);
  big[1001] = 21.0f;
  CHECK(s.sample(big.data(), 1003) == 1001);
}

TEST_CASE("logit_bias moves tokens before any choice: +100 forces one, -100 bans one") {
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 2.5f};
  le::SamplingParams p;
  p.temperature = 0;
  p.logit_bias = {{1, -100.0f}};
  CHECK_FALSE(p.plain_greedy());  // the device's argmax alone would miss the bias
  auto l = logits;
  CHECK(le::Sampler(p, {}).sample(l.data(), 4) == 3);
  p.logit_bias = {{2, 100.0f}, {99, 100.0f}};  // an id past the vocabulary changes nothing
  l = logits;
  CHECK(le::Sampler(p, {}).sample(l.data(), 4) == 2);
  p.temperature = 1;
  p.logit_bias = {{0, 100.0f}};
  CHECK(histogram(p, logits, 200)[0] == 200);
}

TEST_CASE("top-k, top-p and min-p keep only the likely tokens") {
  std::vector<float> logits = {2.0f, 1.9f, 0.0f, -5.0f, 1.8f};
  le::SamplingParams p;
  p.top_k = 2;
  auto h = histogram(p, logits, 2000);
  CHECK(h.size() == 2);
  CHECK(h.count(0) == 1);
  CHECK(h.count(1) == 1);

  p = {};
  p.top_p = 0.5f;  // token 0 alone holds ~37%; with token 1 ~71%
  h = histogram(p, logits, 2000);
  CHECK(h.size() == 2);

  p = {};
  p.min_p = 0.5f;  // keeps tokens within half the best probability: 0, 1, 4
  h = histogram(p, logits, 4000);
  CHECK(h.size() == 3);
  CHECK(h.count(2) == 0);
  CHECK(h.count(3) == 0);
}

TEST_CASE("temperature sampling follows the softmax, and a seed repeats it") {
  std::vector<float> logits = {0.0f, std::log(3.0f)};  // p = 0.25, 0.75
  le::SamplingParams p;
  p.seed = 11;
  auto h = histogram(p, logits, 20000);
  CHECK(h[1] / 20000.0 == Approx(0.75).margin(0.02));
  CHECK(histogram(p, logits, 500) == histogram(p, logits, 500));
}

TEST_CASE("penalties push repeated tokens down") {
  le::SamplingParams p;
  p.temperature = 0;
  p.frequency_penalty = 1.0f;
  le::Sampler s(p, {});
  std::vector<float> l = {1.0f, 0.5f};
  CHECK(s.sample(l.data(), 2) == 0);
  s.accept(0);
  l = {1.0f, 0.5f};
  CHECK(s.sample(l.data(), 2) == 1);  // 1.0 - 1.0 < 0.5

  le::SamplingParams r;
  r.temperature = 0;
  r.repetition_penalty = 3.0f;
  le::Sampler rs(r, {0});  // the prompt counts
  l = {1.0f, 0.5f};
  CHECK(rs.sample(l.data(), 2) == 1);  // 1.0 / 3 < 0.5
}

TEST_CASE("stop sequences are found across pieces and never leak") {
  le::StopMatcher m({"</end>", "STOP"});
  std::string out;
  for (std::string piece : {"hello <", "/e", "nd> more"}) {
    auto r = m.push(piece);
    out += r.text;
    if (r.stopped) break;
  }
  CHECK(out == "hello ");

  le::StopMatcher held({"abc"});
  CHECK(held.push("xxa").text == "xx");  // "a" may start "abc"
  CHECK(held.push("b").text.empty());
  auto r = held.push("d");
  CHECK(r.text == "abd");
  CHECK_FALSE(r.stopped);
  CHECK(held.push("ab").text.empty());
  CHECK(held.finish() == "ab");
}

TEST_CASE("token logprobs are the log-softmax, with the likeliest tokens first") {
  std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l));
  auto expected = [&](std::size_t i) { return static_cast<double>(logits[i]) - std::log(sum); };

  auto lp = le::token_logprobs(logits.data(), 5, 4, 3);
  CHECK(lp.chosen.id == 4);
  CHECK(lp.chosen.logprob == Approx(expected(4)).margin(1e-6));
  REQUIRE(lp.top.size() == 3);
  CHECK(lp.top[0].id == 1);  // a tie goes to the lower id
  CHECK(lp.top[1].id == 3);
  CHECK(lp.top[2].id == 0);
  for (const auto& c : lp.top) CHECK(c.logprob == Approx(expected(static_cast<std::size_t>(c.id))).margin(1e-6));

  // None asked: only the chosen token. More than the vocabulary: all of it.
  CHECK(le::token_logprobs(logits.data(), 5, 2, 0).top.empty());
  auto all = le::token_logprobs(logits.data(), 5, 2, 20);
  REQUIRE(all.top.size() == 5);
  double total = 0;
  for (const auto& c : all.top) total += std::exp(static_cast<double>(c.logprob));
  CHECK(total == Approx(1.0).margin(1e-5));
  CHECK(all.top.back().id == 2);

  // Large logits do not overflow.
  std::vector<float> huge = {1000.0f, 999.0f};
  auto h = le::token_logprobs(huge.data(), 2, 1, 1);
  CHECK(h.chosen.logprob == Approx(-1.0 - std::log1p(std::exp(-1.0))).margin(1e-4));
  CHECK(h.top[0].logprob == Approx(-std::log1p(std::exp(-1.0))).margin(1e-4));
}
