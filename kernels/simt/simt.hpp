// A SIMT emulation: the CUDA kernels of kernels/ compiled as plain C++ and run
// on the host, so they are checked against the CPU device on machines without
// a GPU (kernels/README.md, "The emulation").
//
// What it models: a launch runs the blocks of its grid one after another on
// the calling thread; the threads of a block run as cooperating fibers, each
// running until it reaches a barrier (__syncthreads, a warp shuffle or vote,
// __syncwarp) or returns. A barrier releases its threads once every live
// thread it waits for has arrived, so shared memory, barriers, warp shuffles
// and votes behave as the CUDA programming model defines them; a barrier that
// can never release (threads of a block waiting at different barriers) is
// reported, not hung. __shared__ memory is per block; atomics are real atomic
// operations, so launches running at once on several host threads stay exact.
//
// What it does not model: timing, occupancy, coalescing, bank conflicts, the
// memory model between barriers (a race between two barriers is not found:
// fibers run in a fixed order, so its outcome is one of the legal ones), and
// independent thread scheduling within a warp.
//
// Only for translation units that are not compiled by nvcc: it defines the
// CUDA keywords (__global__, __shared__, threadIdx ...) as macros.
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace simt {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline constexpr int kWarpSize = 32;

namespace detail {

// The running emulated thread's coordinates (valid only inside a launch).
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();
void* dynamic_shared();

void syncthreads();
// Waits for the warp's live lanes (all of them: the emulation runs every lane
// of a warp to the same barrier).
void syncwarp();
// Publishes `value` for the warp, then returns what lane `src` published. The
// lanes of the warp meet twice, so a value is never overwritten before it is read.
std::uint64_t warp_exchange(std::uint64_t value, int src);
// Each live lane's `predicate`, one bit per lane.
std::uint32_t warp_ballot(bool predicate);

// Runs `body` once per thread of every block of the grid.
void run(const std::function<void()>& body, dim3 grid, dim3 block, std::size_t shared_bytes);

template <typename T>
std::uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a warp shuffle moves at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(std::uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace detail

// A launch with its configuration, called with the kernel's arguments (taken by
// value, as a real launch copies them).
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  std::size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    auto bound = [kernel = kernel, ... values = static_cast<Params>(std::forward<Args>(args))] { kernel(values...); };
    detail::run(bound, grid, block, shared_bytes);
  }
};
template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes) {
  return {kernel, grid, block, shared_bytes};
}

// Stream capture as the emulation models it (the runtime's graphs,
// kernels/runtime_emu.cpp): while a host thread records, its launches are kept
// instead of run, each with its arguments as they were at the launch; running
// the recording launches them again in order, reading memory as it is then.
// Other work (the runtime's copies) is kept with record().
using Recording = std::vector<std::function<void()>>;
void begin_recording(Recording& into);  // throws std::logic_error when this thread already records
void end_recording();
bool recording();
void record(std::function<void()> work);  // keeps `work`; only while recording

}  // namespace simt

// ---- the CUDA surface the kernels use ----------------------------------------

using dim3 = simt::dim3;
using uint3 = simt::dim3;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// One instance per host thread; blocks of a launch run in turn on one host
// thread, so it is the block's shared memory.
#define __shared__ static thread_local
#define threadIdx (::simt::detail::thread_idx())
#define blockIdx (::simt::detail::block_idx())
#define blockDim (::simt::detail::block_dim())
#define gridDim (::simt::detail::grid_dim())
#define warpSize (::simt::kWarpSize)

inline void __syncthreads() { simt::detail::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::detail::syncwarp(); }

template <typename T>
T __shfl_sync(unsigned, T value, int src_lane, int width = warpSize) {
  int lane = simt::detail::lane_id();
  int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return simt::detail::from_bits<T>(simt::detail::warp_exchange(simt::detail::to_bits(value), src));
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = warpSize) {
  int lane = simt::detail::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return simt::detail::from_bits<T>(simt::detail::warp_exchange(simt::detail::to_bits(value), src));
}
template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = warpSize) {
  int lane = simt::detail::lane_id();
  int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return simt::detail::from_bits<T>(simt::detail::warp_exchange(simt::detail::to_bits(value), src));
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta, int width = warpSize) {
  int lane = simt::detail::lane_id();
  int src = (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return simt::detail::from_bits<T>(simt::detail::warp_exchange(simt::detail::to_bits(value), src));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return simt::detail::warp_ballot(predicate != 0) & mask;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return (simt::detail::warp_ballot(predicate != 0) & mask) == (simt::detail::warp_ballot(true) & mask);
}

// Atomics: real ones (std::atomic_ref), returning the old value as CUDA does.
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
namespace simt::detail {
// Stores `value` when it beats the current one; returns the old value.
template <typename T, typename Beats>
T atomic_replace_if(T* address, T value, Beats beats) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (beats(value, old) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
}  // namespace simt::detail
template <typename T>
T atomicMax(T* address, T value) {
  return simt::detail::atomic_replace_if(address, value, [](T a, T b) { return b < a; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return simt::detail::atomic_replace_if(address, value, [](T a, T b) { return a < b; });
}

// Half and bfloat16: storage types with CUDA's conversions (round to nearest even).
struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __half2float(__half h) {
  std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  std::uint32_t magnitude = h.bits & 0x7fffu;
  float f = std::bit_cast<float>(magnitude << 13) * 0x1p112f;
  std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if (magnitude >= 0x7c00u) bits = 0x7f800000u | (magnitude & 0x3ffu) << 13;
  return std::bit_cast<float>(bits | sign);
}
__half __float2half(float f);
inline float __bfloat162float(__nv_bfloat16 h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h.bits) << 16);
}
__nv_bfloat16 __float2bfloat16(float f);

// Four signed (or unsigned) byte products of a and b, summed onto c.
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) {
    c += static_cast<std::int8_t>(static_cast<unsigned>(a) >> (8 * i)) *
         static_cast<std::int8_t>(static_cast<unsigned>(b) >> (8 * i));
  }
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}

inline float __uint_as_float(unsigned bits) { return std::bit_cast<float>(bits); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
