// Decode throughput of the local engine against the machine's memory
// bandwidth: single-stream decode reads every weight once per token, so
// bandwidth / weight bytes is its ceiling. Prints one line per stream count,
// then a long prompt's prefill time, cold and from the prefix cache.
//
//   tollgate_engine_bench MODEL.gguf [TOKENS_PER_STREAM] [STREAMS...]
//   DEVICE=cuda tollgate_engine_bench ...   (auto | cpu | cuda | cuda-emulated; default cpu)
// On the CUDA device the ceiling is the GPU's peak memory bandwidth
// (cudaGetDeviceProperties: memory clock x bus width), read only.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "local_engine/engine.hpp"

namespace le = tollgate::local_engine;
using Clock = std::chrono::steady_clock;

namespace {

// Best of several passes of a 512 MiB copy: read + write bytes per second,
// the traffic a streaming kernel sees.
double copy_bandwidth() {
  const std::size_t n = std::size_t{512} << 20;
  std::vector<char> a(n, 1), b(n, 2);
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), n);
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n) / s);
    std::swap(a, b);
  }
  return best;
}

std::size_t weight_bytes(const le::Model& m) {
  std::size_t total = m.output.bytes() + m.output_norm.bytes();
  for (const auto& l : m.layers) {
    for (const auto* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_down, &l.w_up}) {
      total += t->bytes();
    }
  }
  return total;
}

// Runs `streams` requests of `tokens` generated tokens at once; returns
// generated tokens per second over the wall time of the decode phase.
double run(le::Engine& engine, int streams, std::int64_t tokens) {
  std::mutex mutex;
  std::condition_variable cv;
  int finished = 0;
  std::int64_t generated = 0;
  auto t0 = Clock::now();
  for (int i = 0; i < streams; ++i) {
    le::GenerationRequest r;
    r.prompt = engine.tokenizer().encode("Once upon a time " + std::to_string(i), true);
    r.sampling.temperature = 0;
    r.max_tokens = tokens;
    auto s = engine.submit(std::move(r), [&](le::GenerationEvent e) {
      if (e.type == le::GenerationEvent::Type::text) return;
      std::lock_guard lock(mutex);
      generated += e.completion_tokens;
      ++finished;
      cv.notify_one();
    });
    if (s.refusal != le::Engine::Refusal::none) {
      std::fprintf(stderr, "refused: %s\n", s.message.c_str());
      std::exit(1);
    }
  }
  std::unique_lock lock(mutex);
  cv.wait(lock, [&] { return finished == streams; });
  return static_cast<double>(generated) / std::chrono::duration<double>(Clock::now() - t0).count();
}

// Seconds from submitting `prompt` (one token wanted) to its end: the prefill.
double time_to_first_token(le::Engine& engine, std::vector<std::int32_t> prompt) {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  le::GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.max_tokens = 1;
  auto t0 = Clock::now();
  engine.submit(std::move(r), [&](le::GenerationEvent e) {
    if (e.type == le::GenerationEvent::Type::text) return;
    std::lock_guard lock(mutex);
    done = true;
    cv.notify_one();
  });
  std::unique_lock lock(mutex);
  cv.wait(lock, [&] { return done; });
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL.gguf [TOKENS_PER_STREAM] [STREAMS...]\n", argv[0]);
    return 2;
  }
  std::int64_t tokens = argc > 2 ? std::atoll(argv[2]) : 64;
  std::vector<int> stream_counts;
  for (int i = 3; i < argc; ++i) stream_counts.push_back(std::atoi(argv[i]));
  if (stream_counts.empty()) stream_counts = {1, 4, 16};

  const char* device_env = std::getenv("DEVICE");
  std::string why;
  auto device = le::make_device(device_env != nullptr ? device_env : "cpu", 0, why);
  const double gpu_peak = le::cuda_peak_bandwidth();
  const bool on_gpu = device->name().starts_with("cuda (");
  double bandwidth = on_gpu ? gpu_peak : copy_bandwidth();
  auto model = le::load_model(argv[1]);
  auto bytes = weight_bytes(model);
  std::string name = model.name, type = model.file_type;
  le::EngineConfig config;
  config.max_num_seqs = *std::max_element(stream_counts.begin(), stream_counts.end());
  config.max_model_len = 512;
  le::Engine engine(std::move(model), config, std::move(device));

  // Single-stream decode streams every weight once per token: at best the
  // copy loop's rate (bytes read + written per second) over the weight bytes.
  double ceiling = bandwidth / static_cast<double>(bytes);
  std::printf("model %s (%s), %.1f MB of weights read per step; device %s\n", name.c_str(), type.c_str(),
              static_cast<double>(bytes) / 1e6, engine.device_name().c_str());
  std::printf("memory bandwidth (%s) %.2f GB/s -> single-stream ceiling %.1f tokens/s\n",
              on_gpu ? "the GPU's peak, cudaGetDeviceProperties" : "copy loop, read+write", bandwidth / 1e9, ceiling);
  run(engine, 1, 8);  // warm the page cache and the buffers
  double single = 0;
  for (int streams : stream_counts) {
    double rate = run(engine, streams, tokens);
    if (streams == 1) single = rate;
    std::printf("streams %2d: %8.1f tokens/s aggregate", streams, rate);
    if (streams == 1) {
      std::printf("  (%.0f%% of the bandwidth ceiling; weights read at %.1f GB/s)", 100.0 * rate / ceiling,
                  rate * static_cast<double>(bytes) / 1e9);
    }
    if (single > 0 && streams > 1) std::printf("  (%.2fx single stream)", rate / single);
    std::printf("\n");
    std::fflush(stdout);
  }

  // Prefix caching: a long prompt the second time (a chat's history, a
  // shared system prompt) prefills only what the cache does not hold.
  const auto vocab = static_cast<std::int32_t>(engine.model().params.vocab_size);
  for (int round = 0; round < 2; ++round) {
    std::vector<std::int32_t> prompt{engine.model().vocab.bos};
    for (std::int32_t i = 1; i < 448; ++i) prompt.push_back(3 + (i * 7919 + round * 104729) % (vocab - 3));
    double cold = time_to_first_token(engine, prompt);
    double cached = time_to_first_token(engine, prompt);
    if (round == 1) {
      std::printf("prefix cache: a 448-token prompt prefills in %.1f ms, %.1f ms again from the cache (%.1fx)\n",
                  cold * 1e3, cached * 1e3, cold / cached);
      std::printf("prefill: %.0f tokens/s (448-token prompt, cold)\n", 448.0 / cold);
    }
  }
  return 0;
}
