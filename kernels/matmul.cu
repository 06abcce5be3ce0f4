#include "kernels/matmul.cuh"

#include <cmath>

#include "kernels/common.cuh"

namespace tollgate::kernels::TG_KERNEL_NS {
namespace {
constexpr int kWarpsPerBlock = 4;
}  // namespace

// One warp per 32-value block: the block's absolute max by shuffles, then
// each lane rounds its value (half away from zero).
static __global__ void quantize_blocks(const float* x, std::int64_t blocks, BlockQ8_0* out) {
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= blocks) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const float v = x[b * kQuantBlock + lane];
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out[b].q[lane] = static_cast<std::int8_t>(roundf(v * id));
  if (lane == 0) {
    __half h = __float2half(d);
    memcpy(&out[b].scale, &h, sizeof out[b].scale);
  }
}

void quantize_q8_0(const float* x, std::int64_t n, std::int64_t cols, BlockQ8_0* out, cudaStream_t stream) {
  const std::int64_t blocks = n * cols / kQuantBlock;
  if (blocks <= 0) return;
  TG_LAUNCH(quantize_blocks, blocks_for(blocks, 8), 256, 0, stream)(x, blocks, out);
}

// The dot product of weight block `wb` with x block `xb`, both Q8_0 or the
// weight Q4_0, as scale_w * scale_x * Σ q_w q_x.
__device__ __forceinline__ float dot_q8_0(const BlockQ8_0& wb, const BlockQ8_0& xb) {
  int sum = 0;
  for (int i = 0; i < 8; ++i) sum = __dp4a(load_int_b2(wb.q, i), load_int_b2(xb.q, i), sum);
  return half_bits_to_float(wb.scale) * half_bits_to_float(xb.scale) * static_cast<float>(sum);
}
__device__ __forceinline__ float dot_q4_0(const BlockQ4_0& wb, const BlockQ8_0& xb) {
  int sum = 0, x_sum = 0;
  for (int i = 0; i < 4; ++i) {
    const int packed = load_int_b2(wb.q, i);
    const int low = packed & 0x0f0f0f0f;          // values 4i..4i+3
    const int high = (packed >> 4) & 0x0f0f0f0f;  // values 16+4i..16+4i+3
    const int x_low = load_int_b2(xb.q, i), x_high = load_int_b2(xb.q, i + 4);
    sum = __dp4a(low, x_low, sum);
    sum = __dp4a(high, x_high, sum);
    x_sum = __dp4a(0x01010101, x_low, x_sum);
    x_sum = __dp4a(0x01010101, x_high, x_sum);
  }
  return half_bits_to_float(wb.scale) * half_bits_to_float(xb.scale) * static_cast<float>(sum - 8 * x_sum);
}

// Block (row group, token group): warp w takes weight row blockIdx.x * 4 + w
// for tokens blockIdx.y * kMatmulTokens onward; its lanes stride along the
// row (F32/F16/BF16: 16 bytes a lane at a time when the row splits so).
static __global__ void __launch_bounds__(kWarpsPerBlock * 32) matmul_rows(MatmulArgs a) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= a.rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.y) * kMatmulTokens;
  const int tokens = static_cast<int>(a.n - t0 < kMatmulTokens ? a.n - t0 : kMatmulTokens);
  float acc[kMatmulTokens] = {};
  const auto* row = static_cast<const unsigned char*>(a.w) + static_cast<std::size_t>(r) * row_bytes(a.type, a.cols);
  const std::int64_t nb = a.cols / kQuantBlock;
  switch (a.type) {
    case Type::q8_0:
    case Type::q4_0:
      for (std::int64_t b = lane; b < nb; b += 32) {
        for (int t = 0; t < kMatmulTokens; ++t) {
          if (t >= tokens) break;
          const BlockQ8_0& xb = a.xq[(t0 + t) * nb + b];
          acc[t] += a.type == Type::q8_0 ? dot_q8_0(reinterpret_cast<const BlockQ8_0*>(row)[b], xb)
                                         : dot_q4_0(reinterpret_cast<const BlockQ4_0*>(row)[b], xb);
        }
      }
      break;
    default: {
      // 16 bytes a lane a load (8 halves or 4 floats) where rows split so.
      const int width = a.type == Type::f32 ? 4 : 8;
      const std::int64_t wide_cols = a.cols % width == 0 ? a.cols : 0;
      for (std::int64_t c = static_cast<std::int64_t>(lane) * width; c < wide_cols; c += 32 * width) {
        const Bytes16 chunk = load16(row + static_cast<std::size_t>(c) * (a.type == Type::f32 ? 4 : 2));
        float w[8];
        for (int i = 0; i < 4; ++i) {
          const std::uint32_t word = chunk.word[i];
          if (a.type == Type::f32) {
            w[i] = __uint_as_float(word);
          } else if (a.type == Type::f16) {
            w[2 * i] = half_bits_to_float(static_cast<std::uint16_t>(word & 0xffffu));
            w[2 * i + 1] = half_bits_to_float(static_cast<std::uint16_t>(word >> 16));
          } else {
            w[2 * i] = bf16_bits_to_float(static_cast<std::uint16_t>(word & 0xffffu));
            w[2 * i + 1] = bf16_bits_to_float(static_cast<std::uint16_t>(word >> 16));
          }
        }
        for (int t = 0; t < kMatmulTokens; ++t) {
          if (t >= tokens) break;
          const float* xt = a.x + (t0 + t) * a.cols + c;
          float sum = 0.0f;
          for (int i = 0; i < width; ++i) sum += w[i] * xt[i];
          acc[t] += sum;
        }
      }
      for (std::int64_t c = lane; wide_cols == 0 && c < a.cols; c += 32) {
        float w;
        if (a.type == Type::f32) {
          w = reinterpret_cast<const float*>(row)[c];
        } else if (a.type == Type::f16) {
          w = half_bits_to_float(reinterpret_cast<const std::uint16_t*>(row)[c]);
        } else {
          w = bf16_bits_to_float(reinterpret_cast<const std::uint16_t*>(row)[c]);
        }
        for (int t = 0; t < kMatmulTokens; ++t) {
          if (t >= tokens) break;
          acc[t] += w * a.x[(t0 + t) * a.cols + c];
        }
      }
      break;
    }
  }
  for (int t = 0; t < kMatmulTokens; ++t) {
    if (t >= tokens) break;  // the same for the whole warp
    const float sum = warp_sum(acc[t]);
    if (lane == 0) a.y[(t0 + t) * a.rows + r] = sum;
  }
}

void matmul(const MatmulArgs& args, cudaStream_t stream) {
  if (args.n <= 0 || args.rows <= 0) return;
  if (args.type == Type::q8_0 || args.type == Type::q4_0) quantize_q8_0(args.x, args.n, args.cols, args.xq, stream);
  const dim3 grid(blocks_for(args.rows, kWarpsPerBlock), blocks_for(args.n, kMatmulTokens));
  TG_LAUNCH(matmul_rows, grid, kWarpsPerBlock * 32, 0, stream)(args);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
