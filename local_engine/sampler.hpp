// Choosing the next token from logits (greedy, temperature, top-k, top-p,
// min-p, penalties, seeded), and matching stop sequences on the output text.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tollgate::local_engine {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;
  std::int32_t top_k = 0;           // 0: off
  float min_p = 0.0f;               // drop tokens below min_p * p(best)
  float presence_penalty = 0.0f;    // OpenAI's, over generated tokens
  float frequency_penalty = 0.0f;   // OpenAI's, over generated tokens
  float repetition_penalty = 1.0f;  // llama.cpp's, over prompt and generated tokens
  std::uint64_t seed = 0;
  // OpenAI's logit_bias: added to these tokens' logits before anything else.
  std::vector<std::pair<std::int32_t, float>> logit_bias;
  bool greedy() const { return temperature <= 0.0f; }
  // Greedy with nothing that changes logits first: the token is the raw
  // logits' argmax, which a device can pick without sending the logits back.
  bool plain_greedy() const {
    return greedy() && presence_penalty == 0.0f && frequency_penalty == 0.0f && repetition_penalty == 1.0f &&
           logit_bias.empty();
  }
};

// One request's sampler. Its random stream belongs to the request, so the
// same seed gives the same output whatever else runs in the batch.
class Sampler {
 public:
  Sampler(SamplingParams params, const std::vector<std::int32_t>& prompt);

  // Picks a token; `logits` (vocab floats) is used as scratch.
  std::int32_t sample(float* logits, std::int32_t vocab);
  // Records a generated token for the penalties.
  void accept(std::int32_t token);
  const SamplingParams& params() const { return params_; }

 private:
  void apply_penalties(float* logits, std::int32_t vocab);

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::unordered_map<std::int32_t, std::int32_t> generated_;  // token -> count
  std::vector<std::int32_t> seen_;                            // prompt and generated, for repetition_penalty
  std::vector<std::pair<float, std::int32_t>> candidates_;    // scratch
  std::vector<char> penalised_;                               // scratch
};

struct TokenCandidate {
  std::int32_t id = 0;
  float logprob = 0;
};

struct TokenLogprobs {
  TokenCandidate chosen;
  std::vector<TokenCandidate> top;  // most likely first, ties to the lower id
};

// The largest logit's id, the lowest id on ties, so the choice never depends
// on the scan order; NaNs never win.
std::int32_t argmax(const float* logits, std::int32_t vocab);

// The log-softmax of `logits` at `chosen`, and the `top` most likely tokens.
TokenLogprobs token_logprobs(const float* logits, std::int32_t vocab, std::int32_t chosen, std::int32_t top);

// Finds stop sequences in streamed text, across token boundaries: text that
// could still be the start of a stop sequence is held back until it cannot.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  struct Result {
    std::string text;  // safe to send now
    bool stopped = false;
  };
  Result push(std::string_view text);
  // Whatever was held back, once generation ended without a stop.
  std::string finish();

 private:
  std::vector<std::string> stops_;
  std::string held_;
};

}  // namespace tollgate::local_engine
