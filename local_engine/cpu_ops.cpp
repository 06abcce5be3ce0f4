#include "local_engine/cpu_ops.hpp"

#if defined(TOLLGATE_X86_KERNELS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "local_engine/cpu_kernels.hpp"

namespace tollgate::local_engine::cpu {

namespace {

Isa choose_isa() {
  const char* forced = std::getenv("TOLLGATE_CPU");
  const std::string_view cap = forced != nullptr ? forced : "";
  if (cap == "portable") return Isa::portable;
  const bool below_avx512 = cap == "avx2" || cap == "avx2_vnni";
  if (!below_avx512 && cap != "avx512_vnni" && isa_supported(Isa::amx)) return Isa::amx;
  if (!below_avx512 && isa_supported(Isa::avx512_vnni)) return Isa::avx512_vnni;
  if (cap != "avx2" && isa_supported(Isa::avx2_vnni)) return Isa::avx2_vnni;
  return isa_supported(Isa::avx2_fma) ? Isa::avx2_fma : Isa::portable;
}

#if defined(TOLLGATE_X86_KERNELS)
// XCR0: whether the OS saves the register state of YMM (bits 1, 2) or also
// of ZMM (bits 5-7: opmask, upper halves of zmm0-15, zmm16-31). Readable once
// CPUID reports OSXSAVE.
bool os_saves(unsigned mask) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || (ecx & bit_OSXSAVE) == 0) return false;
  unsigned xcr0 = 0, xcr0_high = 0;
  __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
  return (xcr0 & mask) == mask;
}
constexpr unsigned kYmmState = 0x6u;
constexpr unsigned kZmmState = 0xe6u;
constexpr unsigned kTileState = 0x60000u;  // XTILECFG, XTILEDATA

// CPUID.1:ECX bit 29. Read directly: Clang 14 has no "f16c" for
// __builtin_cpu_supports.
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

// CPUID.(EAX=7,ECX=1):EAX bit 4, and the OS saving YMM state. Read directly:
// compilers before GCC 11 and Clang 12 have no "avxvnni" for
// __builtin_cpu_supports.
bool cpu_has_avx_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0 || (eax & (1u << 4)) == 0) return false;
  return os_saves(kYmmState);
}

// CPUID.(EAX=7,ECX=0): EBX bits 16 (F), 30 (BW), 31 (VL), ECX bit 11 (VNNI),
// and the OS saving ZMM state: a hypervisor or kernel may expose the CPUID
// bits without enabling the state, and zmm instructions would then fault.
bool cpu_has_avx512_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  const unsigned ebx_bits = 1u << 16 | 1u << 30 | 1u << 31;
  if ((ebx & ebx_bits) != ebx_bits || (ecx & (1u << 11)) == 0) return false;
  return os_saves(kZmmState);
}

// CPUID.(EAX=7,ECX=0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), the OS
// supporting tile state, and Linux granting this process its (large) tile
// data: a kernel or sandbox that refuses leaves the AVX-512 kernels.
bool cpu_has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  const unsigned edx_bits = 1u << 24 | 1u << 25;
  if ((edx & edx_bits) != edx_bits || !os_saves(kTileState)) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return ::syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

// x quantised to Q8_0 for one matmul call. Per calling thread, and it only
// grows, so a warm engine quantises without allocating.
struct QuantizedActivations {
  std::vector<BlockQ8_0> blocks;
  std::vector<float> scales;
  std::vector<std::int32_t> offsets;
  std::vector<kernels::TokenTile> tiles;
};

// One row of x as Q8_0 (the AVX2 quantiser gives the portable one's bytes).
void quantize_activations(const float* x, BlockQ8_0* out, std::int64_t n, [[maybe_unused]] Isa isa) {
#if defined(TOLLGATE_X86_KERNELS)
  if (isa != Isa::portable) return kernels::avx2::quantize_row_q8_0(x, out, n);
#endif
  quantize_row_q8_0(x, out, n);
}

using RowsKernel = void (*)(const kernels::MatmulArgs&, std::int64_t, std::int64_t);

// The matmul kernel for w's type on isa.
RowsKernel rows_kernel([[maybe_unused]] Isa isa, [[maybe_unused]] DType type) {
#if defined(TOLLGATE_X86_KERNELS)
  switch (isa) {
    case Isa::portable:
      break;
    case Isa::avx2_fma:
      return &kernels::avx2::matmul_rows;
    case Isa::avx2_vnni:
      return &kernels::avx2_vnni::matmul_rows;
    case Isa::avx512_vnni:
    case Isa::amx:
      // Only Q8_0 has 512-bit and AMX kernels; the rest take the best 256-bit
      // one (Zen 4 has AVX-512 VNNI without AVX-VNNI).
      if (type != DType::q8_0) {
        return isa_supported(Isa::avx2_vnni) ? &kernels::avx2_vnni::matmul_rows : &kernels::avx2::matmul_rows;
      }
      // isa_supported(amx) also asks Linux for the tile state, which must
      // precede the first tile instruction even where asserts are off.
      return isa == Isa::amx && isa_supported(Isa::amx) ? &kernels::amx::matmul_rows_q8_0
                                                        : &kernels::avx512_vnni::matmul_rows_q8_0;
  }
#endif
  return &kernels::portable::matmul_rows;
}

}  // namespace

bool isa_supported(Isa isa) {
#if !defined(TOLLGATE_X86_KERNELS)
  return isa == Isa::portable;  // the only kernels built for this architecture
#else
  switch (isa) {
    case Isa::portable:
      return true;
    case Isa::avx2_fma: {
      static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
      return supported;
    }
    case Isa::avx2_vnni: {
      static const bool supported = isa_supported(Isa::avx2_fma) && cpu_has_avx_vnni();
      return supported;
    }
    case Isa::avx512_vnni: {
      static const bool supported = isa_supported(Isa::avx2_fma) && cpu_has_avx512_vnni();
      return supported;
    }
    case Isa::amx: {
      static const bool supported = isa_supported(Isa::avx512_vnni) && cpu_has_amx_int8();
      return supported;
    }
  }
  return false;
#endif
}

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

std::string features() {
  switch (active_isa()) {
    case Isa::portable:
      return "portable";
    case Isa::avx2_fma:
      return "avx2+fma";
    case Isa::avx2_vnni:
      return "avx2+fma+avxvnni";
    case Isa::avx512_vnni:
      return "avx2+fma+avx512vnni";
    case Isa::amx:
      return "avx2+fma+avx512vnni+amx";
  }
  return "portable";
}

void matmul(ThreadPool& pool, const Tensor& w, const float* x, std::int64_t n, float* y) {
  matmul(pool, w, x, n, y, active_isa());
}

void matmul(ThreadPool& pool, const Tensor& w, const float* x, std::int64_t n, float* y, Isa isa) {
  assert(isa_supported(isa));
  if (n <= 0 || w.rows <= 0) return;
  kernels::MatmulArgs args{&w, x, nullptr, nullptr, nullptr, n, y};
  if (w.type == DType::q8_0 || w.type == DType::q4_0) {
    thread_local QuantizedActivations scratch;
    const std::int64_t blocks = w.cols / kQuantBlock;
    const auto total = static_cast<std::size_t>(n * blocks);
    if (scratch.blocks.size() < total) {
      scratch.blocks.resize(total);
      scratch.scales.resize(total);
      scratch.offsets.resize(total);
    }
    // Tokens in whole groups of 16 for the AMX kernel.
    const std::int64_t tiled =
        isa == Isa::amx && w.type == DType::q8_0 ? n / kernels::kTileTokens * kernels::kTileTokens : 0;
    const auto tiles = static_cast<std::size_t>(tiled / kernels::kTileTokens * blocks);
    if (scratch.tiles.size() < tiles) scratch.tiles.resize(tiles);
    // Plain pointers: inside the lambda `scratch` would name the worker's own.
    BlockQ8_0* xq = scratch.blocks.data();
    float* xd = scratch.scales.data();
    std::int32_t* xo = scratch.offsets.data();
    kernels::TokenTile* xt = scratch.tiles.data();
    pool.parallel_for(n, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t t = begin; t < end; ++t) {
        quantize_activations(x + t * w.cols, xq + t * blocks, w.cols, isa);
        for (std::int64_t b = t * blocks; b < (t + 1) * blocks; ++b) {
          xd[b] = fp16_to_f32(xq[b].scale);
          std::int32_t sum = 0;
          for (std::int8_t q : xq[b].q) sum += q;
          xo[b] = -128 * sum;
        }
        if (t < tiled) {
          kernels::TokenTile* group = xt + t / kernels::kTileTokens * blocks;
          for (std::int64_t b = 0; b < blocks; ++b) {
            std::memcpy(group[b].q[t % kernels::kTileTokens], xq[t * blocks + b].q, kQuantBlock);
          }
        }
      }
    });
    args.xq = xq;
    args.xd = xd;
    args.xoffset = xo;
    if (tiled > 0) args.xtiles = xt;
  }
  auto* rows = rows_kernel(isa, w.type);
  // Threads split the rows in interleaved groups so every thread's tiles are whole.
  constexpr std::int64_t kGroup = kernels::kInterleavedRows;
  constexpr int kChunksPerThread = 4;
  // Several chunks per thread even out a thread that starts late or loses its core.
  pool.parallel_for(
      (w.rows + kGroup - 1) / kGroup,
      [&](std::int64_t begin, std::int64_t end) { rows(args, begin * kGroup, std::min(end * kGroup, w.rows)); },
      kChunksPerThread);
}

std::size_t interleaved_bytes(const Tensor& w) {
  assert(w.type == DType::q8_0);
  const std::int64_t groups = (w.rows + kernels::kInterleavedRows - 1) / kernels::kInterleavedRows;
  return static_cast<std::size_t>(groups * kernels::kInterleavedRows) * row_bytes(w.type, w.cols);
}

void interleave_q8_0(const Tensor& w, std::byte* out) {
  assert(w.type == DType::q8_0 && w.cols % kQuantBlock == 0);
  constexpr int kRows = kernels::kInterleavedRows;
  const std::int64_t blocks = w.cols / kQuantBlock;
  kernels::InterleavedQ8Block block;
  for (std::int64_t r0 = 0; r0 < w.rows; r0 += kRows) {
    for (std::int64_t b = 0; b < blocks; ++b) {
      for (int i = 0; i < kRows; ++i) {
        const auto& src = reinterpret_cast<const BlockQ8_0*>(w.row(std::min(r0 + i, w.rows - 1)))[b];
        block.scale[i] = src.scale;
        for (int k = 0; k < 8; ++k) {
          for (int l = 0; l < 4; ++l) block.q[k][4 * i + l] = static_cast<std::uint8_t>(src.q[4 * k + l] ^ 0x80);
        }
      }
      std::memcpy(out, &block, sizeof block);
      out += sizeof block;
    }
  }
}

void dequantize_row(const Tensor& t, std::int64_t row, float* out) {
  const std::byte* data = t.row(row);
  const std::int64_t cols = t.cols;
  switch (t.type) {
    case DType::f32:
      std::memcpy(out, data, static_cast<std::size_t>(cols) * 4);
      return;
    case DType::f16: {
      const auto* h = reinterpret_cast<const std::uint16_t*>(data);
      for (std::int64_t k = 0; k < cols; ++k) out[k] = kernels::half_to_float(h[k]);
      return;
    }
    case DType::bf16: {
      const auto* h = reinterpret_cast<const std::uint16_t*>(data);
      for (std::int64_t k = 0; k < cols; ++k) out[k] = bf16_to_f32(h[k]);
      return;
    }
    case DType::q8_0: {
      const auto* blocks = reinterpret_cast<const BlockQ8_0*>(data);
      for (std::int64_t b = 0; b < cols / kQuantBlock; ++b) {
        const float d = fp16_to_f32(blocks[b].scale);
        for (int l = 0; l < kQuantBlock; ++l) out[b * kQuantBlock + l] = d * blocks[b].q[l];
      }
      return;
    }
    case DType::q4_0: {
      const auto* blocks = reinterpret_cast<const BlockQ4_0*>(data);
      for (std::int64_t b = 0; b < cols / kQuantBlock; ++b) {
        const float d = fp16_to_f32(blocks[b].scale);
        float* o = out + b * kQuantBlock;
        for (int l = 0; l < kQuantBlock / 2; ++l) {
          o[l] = d * static_cast<float>((blocks[b].q[l] & 0x0f) - 8);
          o[l + kQuantBlock / 2] = d * static_cast<float>((blocks[b].q[l] >> 4) - 8);
        }
      }
      return;
    }
  }
}

void rmsnorm(float* out, const float* x, const float* weight, std::int64_t n, float eps) {
  // Eight partial sums: the loop vectorises and the order is fixed.
  float partial[8] = {};
  std::int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) partial[l] += x[k + l] * x[k + l];
  float sum = 0.0f;
  for (float p : partial) sum += p;
  for (; k < n; ++k) sum += x[k] * x[k];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (std::int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * weight[i];
}

void rope(float* v, std::int64_t n_heads, std::int64_t head_dim, std::int64_t pos, float theta) {
  // Angles in double: pos * freq reaches thousands of radians, where f32
  // would lose the fraction that matters.
  for (std::int64_t i = 0; i < head_dim / 2; ++i) {
    const double freq =
        std::pow(static_cast<double>(theta), -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    const double angle = static_cast<double>(pos) * freq;
    const auto c = static_cast<float>(std::cos(angle));
    const auto s = static_cast<float>(std::sin(angle));
    for (std::int64_t h = 0; h < n_heads; ++h) {
      float* p = v + h * head_dim + 2 * i;
      const float a = p[0];
      const float b = p[1];
      p[0] = a * c - b * s;
      p[1] = a * s + b * c;
    }
  }
}

float dot(const float* a, const float* b, std::int64_t n) { return dot(a, b, n, active_isa()); }

float dot(const float* a, const float* b, std::int64_t n, [[maybe_unused]] Isa isa) {
#if defined(TOLLGATE_X86_KERNELS)
  if (isa != Isa::portable) return kernels::avx2::dot(a, b, n);
#endif
  return kernels::portable::dot(a, b, n);
}

void axpy(float a, const float* x, float* y, std::int64_t n) { axpy(a, x, y, n, active_isa()); }

void axpy(float a, const float* x, float* y, std::int64_t n, [[maybe_unused]] Isa isa) {
#if defined(TOLLGATE_X86_KERNELS)
  if (isa != Isa::portable) return kernels::avx2::axpy(a, x, y, n);
#endif
  kernels::portable::axpy(a, x, y, n);
}

void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out) {
  attend(q, keys, values, stride, slots, len, head_dim, scale, scores, out, active_isa());
}

void attend(const float* q, const float* keys, const float* values, std::int64_t stride, const std::int64_t* slots,
            std::int64_t len, std::int64_t head_dim, float scale, float* scores, float* out, [[maybe_unused]] Isa isa) {
#if defined(TOLLGATE_X86_KERNELS)
  if (isa != Isa::portable) {
    return kernels::avx2::attend(q, keys, values, stride, slots, len, head_dim, scale, scores, out);
  }
#endif
  kernels::portable::attend(q, keys, values, stride, slots, len, head_dim, scale, scores, out);
}

void scale(float* x, float a, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) x[i] *= a;
}

void softmax(float* x, std::int64_t n) {
  if (n <= 0) return;
  const float max = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  scale(x, 1.0f / sum, n);
}

void silu_mul(float* gate, const float* up, std::int64_t n) { silu_mul(gate, up, n, active_isa()); }

void silu_mul(float* gate, const float* up, std::int64_t n, [[maybe_unused]] Isa isa) {
#if defined(TOLLGATE_X86_KERNELS)
  if (isa != Isa::portable) return kernels::avx2::silu_mul(gate, up, n);
#endif
  for (std::int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add(float* y, const float* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void quantize_row_q8_0(const float* x, BlockQ8_0* out, std::int64_t n) {
  assert(n % kQuantBlock == 0);
  for (std::int64_t b = 0; b < n / kQuantBlock; ++b) {
    const float* v = x + b * kQuantBlock;
    float amax = 0.0f;
    for (int l = 0; l < kQuantBlock; ++l) amax = std::max(amax, std::fabs(v[l]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].scale = f32_to_fp16(d);
    for (int l = 0; l < kQuantBlock; ++l) {
      // std::round (half away from zero) as truncation plus a carry: exact,
      // since |scaled| <= 127 makes the fraction exact, and a few inline
      // instructions instead of a libm call (activations are quantised on
      // every matmul).
      const float scaled = v[l] * id;
      const auto whole = static_cast<std::int32_t>(scaled);
      const float frac = scaled - static_cast<float>(whole);
      out[b].q[l] = static_cast<std::int8_t>(whole + (frac >= 0.5f ? 1 : 0) - (frac <= -0.5f ? 1 : 0));
    }
  }
}

void quantize_row_q4_0(const float* x, BlockQ4_0* out, std::int64_t n) {
  assert(n % kQuantBlock == 0);
  for (std::int64_t b = 0; b < n / kQuantBlock; ++b) {
    const float* v = x + b * kQuantBlock;
    // The value of largest magnitude, sign kept, maps to -8: the full range.
    float amax = 0.0f;
    float max = 0.0f;
    for (int l = 0; l < kQuantBlock; ++l) {
      if (std::fabs(v[l]) > amax) {
        amax = std::fabs(v[l]);
        max = v[l];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    out[b].scale = f32_to_fp16(d);
    // x * id lies in [-8, 8]; + 8.5 truncated is round-half-up, clamped to 15.
    auto level = [&](float value) { return std::min(15, static_cast<int>(value * id + 8.5f)); };
    for (int l = 0; l < kQuantBlock / 2; ++l) {
      out[b].q[l] = static_cast<std::uint8_t>(level(v[l]) | level(v[l + kQuantBlock / 2]) << 4);
    }
  }
}

}  // namespace tollgate::local_engine::cpu
