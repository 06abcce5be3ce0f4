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
