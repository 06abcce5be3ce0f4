// Every kernel against the CPU device, ggml's test-backend-ops shape: one
// table of ops over many shapes, each compared by normalised mean squared
// error against the CPU device's result with a per-op tolerance.
//
// Built twice: with TG_TEST_KERNELS=emu (the SIMT emulation, runs everywhere)
// and, where nvcc is found, with TG_TEST_KERNELS=cuda (the real kernels; its
// main reports the whole binary skipped when no GPU is present).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/add.cuh"
#include "kernels/argmax.cuh"
#include "kernels/attention.cuh"
#include "kernels/embed.cuh"
#include "kernels/gemm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/runtime.hpp"
#include "kernels/silu_mul.cuh"
#include "kernels/store_kv.cuh"
#include "local_engine/cpu_ops.hpp"
#include "local_engine/device.hpp"
#include "local_engine/kv_cache.hpp"
#include "local_engine/tensor.hpp"

namespace {

namespace k = tollgate::kernels;
namespace dev = tollgate::kernels::TG_TEST_KERNELS;
namespace le = tollgate::local_engine;

// A device allocation holding a copy of a host vector.
template <typename T>
class Buffer {
 public:
  explicit Buffer(std::size_t count) : count_(count), p_(static_cast<T*>(dev::device_alloc(count * sizeof(T)))) {}
  explicit Buffer(const std::vector<T>& host) : Buffer(host.size()) {
    dev::copy_to_device(p_, host.data(), host.size() * sizeof(T), nullptr);
  }
  ~Buffer() { dev::device_free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }
  std::vector<T> read() const {
    std::vector<T> host(count_);
    dev::synchronize(nullptr);
    dev::copy_to_host(host.data(), p_, count_ * sizeof(T), nullptr);
    dev::synchronize(nullptr);
    return host;
  }

 private:
  std::size_t count_;
  T* p_;
};

double nmse(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return norm == 0 ? err : err / norm;
}

std::vector<float> random_floats(std::size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// A weight matrix in `type` with the CPU's view of it.
struct Weights {
  std::vector<std::uint8_t> bytes;
  le::Tensor tensor;
};
Weights make_weights(le::DType type, std::int64_t rows, std::int64_t cols, std::mt19937& rng) {
  Weights w;
  w.bytes.resize(le::row_bytes(type, cols) * static_cast<std::size_t>(rows));
  auto values = random_floats(static_cast<std::size_t>(rows * cols), rng, 0.5f);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* src = &values[static_cast<std::size_t>(r * cols)];
    auto* dst = w.bytes.data() + static_cast<std::size_t>(r) * le::row_bytes(type, cols);
    for (std::int64_t c = 0; c < cols; ++c) {
      switch (type) {
        case le::DType::f32:
          std::memcpy(dst + 4 * c, &src[c], 4);
          break;
        case le::DType::f16: {
          auto h = le::f32_to_fp16(src[c]);
          std::memcpy(dst + 2 * c, &h, 2);
          break;
        }
        case le::DType::bf16: {
          auto h = le::f32_to_bf16(src[c]);
          std::memcpy(dst + 2 * c, &h, 2);
          break;
        }
        default:
          break;
      }
    }
    if (type == le::DType::q8_0) le::cpu::quantize_row_q8_0(src, reinterpret_cast<le::BlockQ8_0*>(dst), cols);
    if (type == le::DType::q4_0) le::cpu::quantize_row_q4_0(src, reinterpret_cast<le::BlockQ4_0*>(dst), cols);
  }
  w.tensor = {type, w.bytes.data(), rows, cols, nullptr};
  return w;
}

const le::DType kTypes[] = {le::DType::f32, le::DType::f16, le::DType::bf16, le::DType::q8_0, le::DType::q4_0};

le::Device& cpu() {
  static auto device = le::make_cpu_device(2);
  return *device;
}

// A random `type` weight (rows x cols) and x (n x cols) on the device, and
// the CPU device's y = x · Wᵀ to compare with.
struct MatmulCase {
  Weights w;
  std::vector<float> want;
  Buffer<std::uint8_t> d_w;
  Buffer<float> d_x, d_y;
  MatmulCase(le::DType type, std::int64_t rows, std::int64_t cols, std::int64_t n, std::mt19937& rng)
      : w(make_weights(type, rows, cols, rng)),
        want(static_cast<std::size_t>(n * rows)),
        d_w(w.bytes),
        d_x(random_floats(static_cast<std::size_t>(n * cols), rng)),
        d_y(want.size()) {
    const auto x = d_x.read();
    cpu().matmul(w.tensor, x.data(), n, want.data());
  }
};

// Hands the CPU device a step's arrays (ops without a cache get a token one).
void begin_step(const le::StepInputs& step, const le::KvCache* cache = nullptr) {
  static const le::KvCache none(1, 1, 1, 1);
  cpu().begin_step(step, cache != nullptr ? *cache : none);
}

}  // namespace

TEST_CASE("kernels: embedding rows of every type", "[kernels][ops]") {
  std::mt19937 rng(1);
  for (auto type : kTypes) {
    for (std::int64_t cols : {64, 288}) {
      const std::int64_t rows = 50;
      auto w = make_weights(type, rows, cols, rng);
      std::vector<std::int32_t> ids{3, 0, 49, 3, 17, 8, 22};
      std::vector<float> want(ids.size() * static_cast<std::size_t>(cols));
      begin_step({.tokens = ids});
      cpu().embed(w.tensor, want.data());
      Buffer<std::uint8_t> table(w.bytes);
      Buffer<std::int32_t> d_ids(ids);
      Buffer<float> out(want.size());
      dev::embed(table.get(), static_cast<k::Type>(type), cols, d_ids.get(), static_cast<std::int64_t>(ids.size()),
                 out.get(), nullptr);
      INFO("type " << le::dtype_name(type) << ", cols " << cols);
      CHECK(nmse(out.read(), want) == 0.0);  // a lookup: exact
    }
  }
}

TEST_CASE("kernels: rmsnorm over ragged row counts and widths", "[kernels][ops]") {
  std::mt19937 rng(2);
  for (std::int64_t n : {1, 5, 33}) {
    for (std::int64_t dim : {64, 288, 2048}) {
      auto x = random_floats(static_cast<std::size_t>(n * dim), rng, 3.0f);
      auto weight = random_floats(static_cast<std::size_t>(dim), rng);
      le::Tensor wt{le::DType::f32, weight.data(), 1, dim, nullptr};
      std::vector<float> want(x.size());
      cpu().rmsnorm(x.data(), wt, n, 1e-5f, want.data());
      Buffer<float> d_x(x), d_w(weight), out(x.size());
      dev::rmsnorm(d_x.get(), d_w.get(), n, dim, 1e-5f, out.get(), nullptr);
      INFO("n " << n << ", dim " << dim);
      CHECK(nmse(out.read(), want) < 1e-10);
    }
  }
}

TEST_CASE("kernels: rope over GQA shapes, head sizes and far positions", "[kernels][ops]") {
  std::mt19937 rng(3);
  struct Shape {
    std::int64_t heads, kv_heads, head_dim;
  };
  for (auto s : {Shape{4, 4, 32}, Shape{8, 2, 64}, Shape{32, 4, 128}, Shape{16, 2, 128}}) {
    const std::int64_t n = 6;
    std::vector<std::int64_t> positions{0, 1, 17, 255, 4095, 30000};
    auto q = random_floats(static_cast<std::size_t>(n * s.heads * s.head_dim), rng);
    auto kk = random_floats(static_cast<std::size_t>(n * s.kv_heads * s.head_dim), rng);
    auto want_q = q, want_k = kk;
    begin_step({.positions = positions});
    cpu().rope(want_q.data(), want_k.data(), {s.heads, s.kv_heads, s.head_dim}, 10000.0f);
    std::vector<std::int32_t> pos32(positions.begin(), positions.end());
    Buffer<float> d_q(q), d_k(kk);
    Buffer<std::int32_t> d_pos(pos32);
    dev::rope(d_q.get(), d_k.get(), d_pos.get(), n, s.heads, s.kv_heads, s.head_dim, 10000.0f, nullptr);
    INFO("heads " << s.heads << "/" << s.kv_heads << ", head_dim " << s.head_dim);
    CHECK(nmse(d_q.read(), want_q) < 1e-12);
    CHECK(nmse(d_k.read(), want_k) < 1e-12);
  }
}

TEST_CASE("kernels: residual add and silu-mul", "[kernels][ops]") {
  std::mt19937 rng(4);
  for (std::int64_t count : {1, 1000, 70001}) {
    auto y = random_floats(static_cast<std::size_t>(count), rng, 4.0f);
    auto x = random_floats(static_cast<std::size_t>(count), rng, 4.0f);
    auto want_add = y, want_silu = y;
    cpu().add(want_add.data(), x.data(), count);
    cpu().silu_mul(want_silu.data(), x.data(), count);
    Buffer<float> d_y(y), d_x(x), d_g(y);
    dev::add(d_y.get(), d_x.get(), count, nullptr);
    dev::silu_mul(d_g.get(), d_x.get(), count, nullptr);
    INFO("count " << count);
    CHECK(nmse(d_y.read(), want_add) == 0.0);
    CHECK(nmse(d_g.read(), want_silu) < 1e-12);
  }
}

TEST_CASE("kernels: matmul on every weight type, ragged batches", "[kernels][ops]") {
  std::mt19937 rng(5);
  for (auto type : kTypes) {
    for (std::int64_t rows : {1, 37}) {
      // 36 and 30: rows that do not split into 16-byte loads (float types only).
      for (std::int64_t cols : {64, 320, 36, 30}) {
        if (cols % 32 != 0 && (type == le::DType::q8_0 || type == le::DType::q4_0)) continue;
        for (std::int64_t n : {1, 9}) {
          MatmulCase c(type, rows, cols, n, rng);
          Buffer<std::uint8_t> scratch(k::matmul_workspace_bytes(static_cast<k::Type>(type), n, cols) + 1);
          k::MatmulArgs args{c.d_w.get(), static_cast<k::Type>(type),
                             rows,        cols,
                             c.d_x.get(), n,
                             c.d_y.get(), reinterpret_cast<k::BlockQ8_0*>(scratch.get())};
          dev::matmul(args, nullptr);
          INFO(le::dtype_name(type) << " " << rows << "x" << cols << ", n " << n);
          // Quantised types round x the same way on both sides: only the
          // order of the float sums differs.
          CHECK(nmse(c.d_y.read(), c.want) < 1e-10);
        }
      }
    }
  }
}

// Prefill-sized batches: W dequantised to F16 tiles (F16 as stored, F32 as
// F32), x rounded to F16, the GEMM (cuBLAS on a GPU, the reference GEMM in the
// emulation). F16 rounding of x, and of W for the quantised types, bounds the
// error; the CPU rounds x to Q8_0 for those instead.
TEST_CASE("kernels: gemm on every weight type, prefill-sized batches", "[kernels][ops]") {
  if (!dev::gemm_available()) {
    WARN("no cuBLAS found: the GEMM path is not tested here");
    return;
  }
  std::mt19937 rng(6);
  for (auto type : kTypes) {
    for (std::int64_t rows : {37, 64}) {
      for (std::int64_t cols : {64, 320}) {
        for (std::int64_t n : {k::kGemmMinTokens, 45}) {
          MatmulCase c(type, rows, cols, n, rng);
          Buffer<std::uint8_t> scratch(k::gemm_workspace_bytes(static_cast<k::Type>(type), n, rows, cols) + 1);
          dev::gemm({c.d_w.get(), static_cast<k::Type>(type), rows, cols, c.d_x.get(), n, c.d_y.get(), scratch.get()},
                    nullptr);
          INFO(le::dtype_name(type) << " " << rows << "x" << cols << ", n " << n);
          // F32: only the order of the sums differs. F16/BF16: x's F16
          // rounding. Q8_0/Q4_0: the CPU's Q8_0 rounding of x (measured
          // 2.5e-5 to 3.1e-5; a wrong element would give ~1).
          const double tolerance = type == le::DType::f32                               ? 1e-10
                                   : type == le::DType::q8_0 || type == le::DType::q4_0 ? 1e-4
                                                                                        : 2e-5;
          CHECK(nmse(c.d_y.read(), c.want) < tolerance);
        }
      }
    }
  }
}

TEST_CASE("kernels: greedy argmax on the device picks the CPU's token", "[kernels][ops]") {
  std::mt19937 rng(6);
  const std::int64_t rows = 4, cols = 1000;
  auto logits = random_floats(static_cast<std::size_t>(rows * cols), rng);
  logits[1 * cols + 10] = 9.0f;  // a tie: the first index wins
  logits[1 * cols + 900] = 9.0f;
  logits[2 * cols + 999] = 50.0f;  // the last element
  for (std::int64_t c = 0; c < cols; ++c) logits[3 * cols + c] = -1.0f;  // all equal
  logits[3 * cols + 5] = NAN;
  Buffer<float> d_logits(logits);
  Buffer<std::int32_t> out(rows);
  dev::argmax(d_logits.get(), rows, cols, out.get(), nullptr);
  auto got = out.read();
  std::vector<std::int32_t> want(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int64_t best = 0;
    for (std::int64_t c = 1; c < cols; ++c) {
      if (logits[r * cols + c] > logits[r * cols + best]) best = c;
    }
    want[r] = static_cast<std::int32_t>(best);
  }
  CHECK(want[1] == 10);
  CHECK(got == want);
}

TEST_CASE("kernels: paged attention over block tables, decode and prefill tokens together", "[kernels][ops]") {
  std::mt19937 rng(7);
  struct Shape {
    std::int64_t heads, kv_heads, head_dim;
  };
  const std::int64_t block_size = 16, num_blocks = 128;
  for (auto s : {Shape{2, 2, 32}, Shape{4, 1, 64}, Shape{8, 1, 128}}) {
    const std::int64_t kv_dim = s.kv_heads * s.head_dim;
    le::KvCache cache(1, num_blocks, block_size, kv_dim);
    // Sequences: a long one (crosses partitions of 256), one that shares its
    // first blocks (a prefix-cached sequence), a short one inside one block,
    // and one ending exactly on a block boundary. Blocks are scattered.
    std::vector<std::int32_t> shuffled(static_cast<std::size_t>(num_blocks));
    for (std::size_t i = 0; i < shuffled.size(); ++i) shuffled[i] = static_cast<std::int32_t>(i);
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    std::size_t next = 0;
    auto table_of = [&](std::int64_t len, const le::KvBlockTable* prefix, std::int64_t shared_blocks) {
      le::KvBlockTable t;
      for (std::int64_t b = 0; b < shared_blocks; ++b) t.blocks.push_back(prefix->blocks[static_cast<std::size_t>(b)]);
      while (static_cast<std::int64_t>(t.blocks.size()) * block_size < len) t.blocks.push_back(shuffled[next++]);
      return t;
    };
    std::vector<le::KvBlockTable> tables;
    tables.reserve(4);
    tables.push_back(table_of(300, nullptr, 0));
    tables.push_back(table_of(70, &tables[0], 3));
    tables.push_back(table_of(5, nullptr, 0));
    tables.push_back(table_of(32, nullptr, 0));
    // Fill every used slot (shared blocks are written once, as a cached prefix is).
    for (const auto& t : tables) {
      for (auto b : t.blocks) {
        for (std::int64_t o = 0; o < block_size; ++o) {
          auto kv = random_floats(static_cast<std::size_t>(kv_dim), rng);
          std::memcpy(cache.key(0, b * block_size + o), kv.data(), kv.size() * sizeof(float));
          kv = random_floats(static_cast<std::size_t>(kv_dim), rng);
          std::memcpy(cache.value(0, b * block_size + o), kv.data(), kv.size() * sizeof(float));
        }
      }
    }
    // The step: decode tokens of sequences 0 and 2, a prefill chunk of
    // sequence 1 (positions 64..69, after its cached prefix), and sequence 3's last.
    std::vector<le::AttentionToken> tokens{{299, &tables[0]}, {4, &tables[2]}};
    for (std::int64_t p = 64; p < 70; ++p) tokens.push_back({p, &tables[1]});
    tokens.push_back({31, &tables[3]});
    const auto n = static_cast<std::int64_t>(tokens.size());
    auto q = random_floats(static_cast<std::size_t>(n * s.heads * s.head_dim), rng);
    std::vector<float> want(q.size());
    begin_step({.attention = tokens}, &cache);
    cpu().attention(cache, 0, q.data(), {s.heads, s.kv_heads, s.head_dim}, want.data());

    // The device's arrays: the block tables flattened, an offset and a position per token.
    std::vector<std::int32_t> flat, offsets, positions;
    std::int64_t max_len = 0;
    for (const auto& t : tokens) {
      offsets.push_back(static_cast<std::int32_t>(flat.size()));
      flat.insert(flat.end(), t.table->blocks.begin(), t.table->blocks.end());
      positions.push_back(static_cast<std::int32_t>(t.pos));
      max_len = std::max(max_len, t.pos + 1);
    }
    const std::size_t storage = static_cast<std::size_t>(num_blocks * block_size * kv_dim);
    std::vector<float> keys(cache.key(0, 0), cache.key(0, 0) + storage);
    std::vector<float> values(cache.value(0, 0), cache.value(0, 0) + storage);
    Buffer<float> d_q(q), d_keys(keys), d_values(values), d_out(q.size());
    Buffer<float> workspace(k::attention_workspace_floats(n, s.heads, s.head_dim, max_len) + 1);
    Buffer<std::int32_t> d_flat(flat), d_offsets(offsets), d_positions(positions);
    k::AttentionArgs args;
    args.q = d_q.get();
    args.keys = d_keys.get();
    args.values = d_values.get();
    args.block_tables = d_flat.get();
    args.table_offsets = d_offsets.get();
    args.positions = d_positions.get();
    args.n = n;
    args.n_heads = s.heads;
    args.n_kv_heads = s.kv_heads;
    args.head_dim = s.head_dim;
    args.block_size = block_size;
    args.max_len = max_len;
    args.out = d_out.get();
    args.workspace = workspace.get();
    dev::paged_attention(args, nullptr);
    INFO("heads " << s.heads << "/" << s.kv_heads << ", head_dim " << s.head_dim);
    CHECK(nmse(d_out.read(), want) < 1e-10);
  }
}

TEST_CASE("kernels: store_kv writes keys and values to their slots", "[kernels][ops]") {
  std::mt19937 rng(8);
  const std::int64_t block_size = 16, num_blocks = 8, kv_dim = 64;
  le::KvCache cache(1, num_blocks, block_size, kv_dim);
  std::vector<std::int64_t> slots{0, 17, 127, 40, 41};
  const auto n = static_cast<std::int64_t>(slots.size());
  auto kk = random_floats(static_cast<std::size_t>(n * kv_dim), rng);
  auto vv = random_floats(static_cast<std::size_t>(n * kv_dim), rng);
  const std::size_t storage = static_cast<std::size_t>(num_blocks * block_size * kv_dim);
  std::vector<float> zeros(storage, 0.0f);
  std::memcpy(cache.key(0, 0), zeros.data(), storage * sizeof(float));
  std::memcpy(cache.value(0, 0), zeros.data(), storage * sizeof(float));
  begin_step({.slots = slots}, &cache);
  cpu().store_kv(cache, 0, kk.data(), vv.data());
  Buffer<float> d_keys(zeros), d_values(zeros), d_k(kk), d_v(vv);
  Buffer<std::int64_t> d_slots(slots);
  dev::store_kv(d_keys.get(), d_values.get(), d_k.get(), d_v.get(), d_slots.get(), n, kv_dim, nullptr);
  CHECK(d_keys.read() == std::vector<float>(cache.key(0, 0), cache.key(0, 0) + storage));
  CHECK(d_values.read() == std::vector<float>(cache.value(0, 0), cache.value(0, 0) + storage));
}
