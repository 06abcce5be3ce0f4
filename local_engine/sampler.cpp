#include "local_engine/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace tollgate::local_engine {

// The maximum first, in eight independent lanes, then its first position:
// std::max_element's one compare chain through memory took several cycles a
// logit, the largest single-threaded cost of a batched step.
std::int32_t argmax(const float* logits, std::int32_t vocab) {
  constexpr int kLanes = 8;
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  std::int32_t i = 0;
  for (; i + kLanes <= vocab; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = logits[i + l] > lanes[l] ? logits[i + l] : lanes[l];
  }
  float max = *std::max_element(lanes, lanes + kLanes);
  for (; i < vocab; ++i) max = logits[i] > max ? logits[i] : max;
  for (i = 0; i < vocab; ++i) {
    if (logits[i] == max) return i;
  }
  return 0;
}

Sampler::Sampler(SamplingParams params, const std::vector<std::int32_t>& prompt)
    : params_(params), rng_(params.seed), seen_(prompt) {}

void Sampler::accept(std::int32_t token) {
  ++generated_[token];
  seen_.push_back(token);
}

void Sampler::apply_penalties(float* logits, std::int32_t vocab) {
  for (const auto& [token, bias] : params_.logit_bias) {
    if (token >= 0 && token < vocab) logits[token] += bias;
  }
  if (params_.repetition_penalty != 1.0f) {
    penalised_.assign(static_cast<std::size_t>(vocab), 0);
    for (auto t : seen_) {
      if (t < 0 || t >= vocab || penalised_[static_cast<std::size_t>(t)]) continue;
      penalised_[static_cast<std::size_t>(t)] = 1;
      float& l = logits[t];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    for (auto [t, count] : generated_) {
      if (t < 0 || t >= vocab) continue;
      logits[t] -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
    }
  }
}

std::int32_t Sampler::sample(float* logits, std::int32_t vocab) {
  apply_penalties(logits, vocab);
  if (params_.greedy()) {
    return argmax(logits, vocab);
  }
  candidates_.clear();
  for (std::int32_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) candidates_.emplace_back(logits[i] / params_.temperature, i);
  }
  if (candidates_.empty()) return 0;
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::size_t keep = candidates_.size();
  if (params_.top_k > 0 && static_cast<std::size_t>(params_.top_k) < keep) {
    keep = static_cast<std::size_t>(params_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(keep), candidates_.end(),
                      by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  candidates_.resize(keep);
  // Softmax over what is left, in place: .first becomes a probability.
  float max = candidates_.front().first;
  double sum = 0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max);
    sum += c.first;
  }
  for (auto& c : candidates_) c.first = static_cast<float>(c.first / sum);
  if (params_.min_p > 0.0f) {
    float floor = params_.min_p * candidates_.front().first;
    auto end = std::find_if(candidates_.begin(), candidates_.end(), [&](const auto& c) { return c.first < floor; });
    candidates_.erase(std::max(end, candidates_.begin() + 1), candidates_.end());
  }
  if (params_.top_p < 1.0f) {
    double cumulative = 0;
    std::size_t n = 0;
    while (n < candidates_.size()) {
      cumulative += candidates_[n++].first;
      if (cumulative >= params_.top_p) break;
    }
    candidates_.resize(std::max<std::size_t>(n, 1));
  }
  double total = 0;
  for (const auto& c : candidates_) total += c.first;
  double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (const auto& c : candidates_) {
    r -= c.first;
    if (r < 0) return c.second;
  }
  return candidates_.back().second;
}

TokenLogprobs token_logprobs(const float* logits, std::int32_t vocab, std::int32_t chosen, std::int32_t top) {
  const float max = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (std::int32_t i = 0; i < vocab; ++i) sum += std::exp(logits[i] - max);
  const double log_sum = max + std::log(sum);
  auto logprob = [&](std::int32_t i) { return static_cast<float>(logits[i] - log_sum); };

  TokenLogprobs out;
  out.chosen = {chosen, logprob(chosen)};
  const auto n = static_cast<std::size_t>(std::clamp(top, 0, vocab));
  if (n == 0) return out;
  // One pass keeping the best n in order; later ids go after equal values.
  auto& best = out.top;
  best.reserve(n + 1);
  for (std::int32_t i = 0; i < vocab; ++i) {
    if (best.size() == n && logits[i] <= logits[best.back().id]) continue;
    auto at = std::upper_bound(best.begin(), best.end(), logits[i],
                               [&](float value, const TokenCandidate& c) { return value > logits[c.id]; });
    best.insert(at, {i, 0});
    if (best.size() > n) best.pop_back();
  }
  for (auto& c : best) c.logprob = logprob(c.id);
  return out;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

StopMatcher::Result StopMatcher::push(std::string_view text) {
  held_.append(text);
  if (stops_.empty()) return {std::exchange(held_, {}), false};
  std::size_t first = std::string::npos;
  for (const auto& stop : stops_) first = std::min(first, held_.find(stop));
  if (first != std::string::npos) {
    Result r{held_.substr(0, first), true};
    held_.clear();
    return r;
  }
  // Hold back the longest tail that is a proper prefix of some stop sequence.
  std::size_t hold = 0;
  for (const auto& stop : stops_) {
    for (std::size_t len = std::min(stop.size() - 1, held_.size()); len > hold; --len) {
      if (held_.compare(held_.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  Result r{held_.substr(0, held_.size() - hold), false};
  held_.erase(0, held_.size() - hold);
  return r;
}

std::string StopMatcher::finish() { return std::exchange(held_, {}); }

}  // namespace tollgate::local_engine
