#include "local_engine/forward.hpp"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>

#include "engine_support.hpp"
#include "reference.hpp"

namespace le = tollgate::local_engine;
using tollgate::test::TempFile;

namespace {

// Runs `tokens` through a fresh cache one step at a time (or all in one
// step) and returns the logits of the last token.
std::vector<float> last_logits(const le::Model& model, const std::vector<std::int32_t>& tokens, bool one_step) {
  auto device = le::make_cpu_device(2);
  const auto& p = model.params;
  le::KvBlockAllocator blocks(64, 16);
  le::KvCache cache(p.n_layers, 64, 16, p.n_kv_heads * p.head_dim(),
                    [&](std::size_t bytes) { return device->allocate(bytes); });
  le::ForwardPass forward(model, *device, cache, 64);
  le::KvBlockTable table;
  REQUIRE(blocks.allocate_slots(table, static_cast<std::int64_t>(tokens.size())));
  std::vector<le::BatchToken> batch;
  std::span<float> logits;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    batch.push_back({tokens[i], static_cast<std::int64_t>(i), &table, i + 1 == tokens.size()});
    if (!one_step) {
      logits = forward.run(batch).logits;
      batch.clear();
    }
  }
  if (one_step) logits = forward.run(batch).logits;
  REQUIRE(logits.size() == static_cast<std::size_t>(p.vocab_size));
  return {logits.begin(), logits.end()};
}

// ggml's test-backend-ops measure: squared error over the reference's energy.
double nmse(const std::vector<float>& reference, const std::vector<float>& x) {
  double err = 0, energy = 0;
  for (std::size_t i = 0; i < reference.size(); ++i) {
    err += (x[i] - reference[i]) * (x[i] - reference[i]);
    energy += reference[i] * reference[i];
  }
  return err / energy;
}

}  // namespace

TEST_CASE("a prefill in one step gives the logits of token-by-token decoding") {
  auto model =
      le::load_model(tollgate::test::shared_model("stories260K.bin"), tollgate::test::shared_model("tok512.bin"));
  std::vector<std::int32_t> tokens = {
      1,   403, 407, 261, 378, 432, 383, 286, 261, 376,
      298, 315, 421, 395, 317, 426, 338, 401, 396, 267};  // the reference story's first tokens
  auto stepwise = last_logits(model, tokens, false);
  auto batched = last_logits(model, tokens, true);
  CHECK(stepwise == batched);  // bit for bit: batching never changes an output
}

TEST_CASE("the GGUF and llama2.c files of stories260K compute the same logits") {
  auto bin =
      le::load_model(tollgate::test::shared_model("stories260K.bin"), tollgate::test::shared_model("tok512.bin"));
  auto gguf = le::load_model(tollgate::test::shared_model("stories260K.gguf"));
  std::vector<std::int32_t> tokens = {1, 291, 280, 294};
  CHECK(last_logits(bin, tokens, true) == last_logits(gguf, tokens, true));
}

TEST_CASE("F16, BF16, Q8_0 and Q4_0 models agree with the F32 model within stated tolerances") {
  le::Hyperparams p;
  p.dim = 128;
  p.hidden_dim = 256;
  p.n_layers = 2;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.vocab_size = 300;
  p.context_length = 64;
  std::vector<std::int32_t> tokens = {1, 100, 200, 50, 7, 299, 3, 42};
  TempFile f32_file("f32.gguf");
  le::write_random_llama_gguf(f32_file.path(), p, le::DType::f32, 3, "test");
  auto reference = last_logits(le::load_model(f32_file.path()), tokens, true);
  // Per type: a bound on the NMSE of the final logits (measured 4e-7, 2.5e-5, 2.7e-4, 3.8e-2).
  for (auto [type, tolerance] :
       {std::pair{le::DType::f16, 1e-5}, {le::DType::bf16, 1e-3}, {le::DType::q8_0, 1e-3}, {le::DType::q4_0, 1e-1}}) {
    INFO(le::dtype_name(type));
    TempFile file(std::string(le::dtype_name(type)) + ".gguf");
    le::write_random_llama_gguf(file.path(), p, type, 3, "test");
    auto model = le::load_model(file.path());
    REQUIRE(model.layers[0].wq.type == type);
    auto logits = last_logits(model, tokens, true);
    auto error = nmse(reference, logits);
    INFO("nmse " << error);
    CHECK(error < tolerance);
    CHECK(error > 0);  // it really is another type
  }
}
