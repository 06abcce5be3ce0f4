// What every kernel file includes: the CUDA headers under nvcc, the SIMT
// emulation (simt/simt.hpp) otherwise, and the few spellings that differ
// between the two. The same op.cu is compiled twice: by nvcc into
// tollgate::kernels::cuda, and as C++ into tollgate::kernels::emu.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/types.hpp"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define TG_KERNEL_NS cuda
// TG_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...)
#define TG_LAUNCH(kernel, grid, block, shared, stream) kernel<<<(grid), (block), (shared), (stream)>>>
// The block's dynamic shared memory as an array of `type`.
#define TG_DYNAMIC_SHARED(type, name) \
  extern __shared__ unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
#else
#include "kernels/simt/simt.hpp"
#define TG_KERNEL_NS emu
#define TG_LAUNCH(kernel, grid, block, shared, stream) \
  ((void)(stream), ::simt::launch(kernel, dim3(grid), dim3(block), (shared)))
#define TG_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::detail::dynamic_shared())
#endif

namespace tollgate::kernels::TG_KERNEL_NS {

__device__ __forceinline__ float half_bits_to_float(std::uint16_t bits) {
  __half h;
  static_assert(sizeof h == sizeof bits);
  memcpy(&h, &bits, sizeof bits);
  return __half2float(h);
}
__device__ __forceinline__ float bf16_bits_to_float(std::uint16_t bits) {
  return __uint_as_float(static_cast<unsigned>(bits) << 16);
}

// Element c of row `row` of a (rows x cols) matrix of `type`, as f32.
__device__ __forceinline__ float load_element(const void* data, Type type, std::int64_t row, std::int64_t cols,
                                              std::int64_t c) {
  const auto* bytes = static_cast<const unsigned char*>(data) + static_cast<std::size_t>(row) * row_bytes(type, cols);
  switch (type) {
    case Type::f32:
      return reinterpret_cast<const float*>(bytes)[c];
    case Type::f16:
      return half_bits_to_float(reinterpret_cast<const std::uint16_t*>(bytes)[c]);
    case Type::bf16:
      return bf16_bits_to_float(reinterpret_cast<const std::uint16_t*>(bytes)[c]);
    case Type::q8_0: {
      const auto& b = reinterpret_cast<const BlockQ8_0*>(bytes)[c / kQuantBlock];
      return half_bits_to_float(b.scale) * static_cast<float>(b.q[c % kQuantBlock]);
    }
    case Type::q4_0: {
      const auto& b = reinterpret_cast<const BlockQ4_0*>(bytes)[c / kQuantBlock];
      const int j = static_cast<int>(c % kQuantBlock);
      const int nibble = j < 16 ? (b.q[j] & 0x0f) : (b.q[j - 16] >> 4);
      return half_bits_to_float(b.scale) * static_cast<float>(nibble - 8);
    }
  }
  return 0.0f;
}

// Sixteen bytes at a 16-byte-aligned address in one load (ld.global.v4 on
// the GPU): a lane's share of a weight row, so loads in flight carry 16 bytes.
struct alignas(16) Bytes16 {
  std::uint32_t word[4];
};
__device__ __forceinline__ Bytes16 load16(const void* p) { return *static_cast<const Bytes16*>(p); }

// Four bytes at a 2-byte-aligned address (a quantised block's values start
// after its 2-byte scale) as one int, for __dp4a.
__device__ __forceinline__ int load_int_b2(const void* p, int i) {
  const auto* halves = static_cast<const std::uint16_t*>(p) + 2 * i;
  return static_cast<int>(static_cast<unsigned>(halves[0]) | static_cast<unsigned>(halves[1]) << 16);
}

// Sums over a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int warps = (blockDim.x + warpSize - 1) / warpSize;
  v = warp_max(v);
  if (warps == 1) return v;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Sums over a block of whole warps (at most 32); every thread gets the total.
// `scratch` holds 32 floats of shared memory, free between calls.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int warps = (blockDim.x + warpSize - 1) / warpSize;
  v = warp_sum(v);
  if (warps == 1) return v;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

}  // namespace tollgate::kernels::TG_KERNEL_NS
