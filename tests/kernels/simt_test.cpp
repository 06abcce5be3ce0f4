// The SIMT emulation on its own: barriers, shared memory, warp shuffles and
// votes, atomics, half conversions and __dp4a behave as CUDA defines them.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/common.cuh"
#include "kernels/gemm.cuh"
#include "kernels/runtime.hpp"

namespace {

// One block sums its slice through shared memory, halving each round.
__global__ void block_reduce(const float* in, float* out, int n) {
  __shared__ float partial[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  partial[threadIdx.x] = i < n ? in[i] : 0.0f;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Each warp sums its lanes with shuffles; lane 0 writes.
__global__ void warp_reduce(const int* in, int* out) {
  int v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % warpSize == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / warpSize] = v;
}

// Every lane gets lane (lane + 1) % 32's value and the warp's max through xor.
__global__ void warp_shuffles(const float* in, float* rotated, float* maxima) {
  const int lane = threadIdx.x % warpSize;
  float v = in[threadIdx.x];
  rotated[threadIdx.x] = __shfl_sync(0xffffffffu, v, (lane + 1) % warpSize);
  maxima[threadIdx.x] = tollgate::kernels::emu::warp_max(v);
}

__global__ void warp_votes(const int* in, unsigned* ballots, int* any, int* all) {
  const int p = in[threadIdx.x];
  unsigned b = __ballot_sync(0xffffffffu, p);
  int a = __any_sync(0xffffffffu, p);
  int l = __all_sync(0xffffffffu, p);
  if (threadIdx.x % warpSize == 0) {
    ballots[threadIdx.x / warpSize] = b;
    any[threadIdx.x / warpSize] = a;
    all[threadIdx.x / warpSize] = l;
  }
}

// A 32x32 tile through shared memory (padded by one against bank conflicts, as on a GPU).
__global__ void transpose(const float* in, float* out, int rows, int cols) {
  __shared__ float tile[32][33];
  const int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;
  if (x < cols && y < rows) tile[threadIdx.y][threadIdx.x] = in[y * cols + x];
  __syncthreads();
  const int tx = blockIdx.y * 32 + threadIdx.x, ty = blockIdx.x * 32 + threadIdx.y;
  if (tx < rows && ty < cols) out[ty * rows + tx] = tile[threadIdx.x][threadIdx.y];
}

__global__ void count(unsigned long long* counter, float* sum, int* maximum, int* lock, int* guarded) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(counter, 1ull);
  atomicAdd(sum, 0.5f);
  atomicMax(maximum, i);
  // A spin lock by compare-and-swap, released at once: each thread in turn.
  if (threadIdx.x == 0) {
    while (atomicCAS(lock, 0, 1) != 0) {
    }
    *guarded += 1;
    atomicExch(lock, 0);
  }
}

__global__ void diverged(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  }
}

__global__ void dot4(const int* a, const int* b, int* out) { out[threadIdx.x] = __dp4a(a[threadIdx.x], b[threadIdx.x], 7); }

__global__ void dynamic_shared_sum(const int* in, int* out) {
  TG_DYNAMIC_SHARED(int, values);
  values[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += values[i];
    *out = s;
  }
}

// data[i] = data[i] * scale + add[i]: a kernel argument and a memory read.
__global__ void scale_add(float* data, const float* add, float scale, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) data[i] = data[i] * scale + add[i];
}

}  // namespace

TEST_CASE("simt: a block reduction through shared memory and __syncthreads", "[kernels][simt]") {
  const int n = 1000;
  std::vector<float> in(n);
  for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i % 17) - 3.0f;
  const unsigned blocks = tollgate::kernels::blocks_for(n, 256);
  std::vector<float> partial(blocks, -1.0f);
  TG_LAUNCH(block_reduce, blocks, 256, 0, nullptr)(in.data(), partial.data(), n);
  for (unsigned b = 0; b < blocks; ++b) {
    float expected = 0;
    for (int i = static_cast<int>(b) * 256; i < std::min(n, static_cast<int>(b + 1) * 256); ++i) expected += in[i];
    CHECK(partial[b] == expected);
  }
}

TEST_CASE("simt: a warp reduction by shuffles, and shuffles that read other lanes", "[kernels][simt]") {
  std::vector<int> in(4 * 128);
  std::iota(in.begin(), in.end(), 1);
  std::vector<int> sums(16, 0);
  TG_LAUNCH(warp_reduce, 4, 128, 0, nullptr)(in.data(), sums.data());
  for (int w = 0; w < 16; ++w) {
    int expected = 0;
    for (int l = 0; l < 32; ++l) expected += in[w * 32 + l];
    CHECK(sums[w] == expected);
  }

  std::vector<float> values(64), rotated(64), maxima(64);
  for (int i = 0; i < 64; ++i) values[i] = static_cast<float>((i * 37) % 64);
  TG_LAUNCH(warp_shuffles, 1, 64, 0, nullptr)(values.data(), rotated.data(), maxima.data());
  for (int i = 0; i < 64; ++i) {
    int w = i / 32;
    CHECK(rotated[i] == values[w * 32 + (i % 32 + 1) % 32]);
    CHECK(maxima[i] == *std::max_element(values.begin() + w * 32, values.begin() + w * 32 + 32));
  }
}

TEST_CASE("simt: warp votes", "[kernels][simt]") {
  std::vector<int> predicates(96, 0);
  for (int i = 0; i < 32; ++i) predicates[i] = i % 3 == 0;  // warp 0: some
  for (int i = 32; i < 64; ++i) predicates[i] = 1;          // warp 1: all
  std::vector<unsigned> ballots(3);
  std::vector<int> any(3), all(3);
  TG_LAUNCH(warp_votes, 1, 96, 0, nullptr)(predicates.data(), ballots.data(), any.data(), all.data());
  unsigned expected = 0;
  for (int i = 0; i < 32; i += 3) expected |= 1u << i;
  CHECK(ballots == std::vector<unsigned>{expected, 0xffffffffu, 0u});
  CHECK(any == std::vector<int>{1, 1, 0});
  CHECK(all == std::vector<int>{0, 1, 0});
}

TEST_CASE("simt: a shared-memory transpose over a 2-D grid with ragged edges", "[kernels][simt]") {
  const int rows = 45, cols = 70;
  std::vector<float> in(rows * cols), out(rows * cols, -1.0f);
  for (int i = 0; i < rows * cols; ++i) in[i] = static_cast<float>(i);
  TG_LAUNCH(transpose, dim3(tollgate::kernels::blocks_for(cols, 32), tollgate::kernels::blocks_for(rows, 32)),
            dim3(32, 32), 0, nullptr)(in.data(), out.data(), rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) REQUIRE(out[c * rows + r] == in[r * cols + c]);
  }
}

TEST_CASE("simt: atomics stay exact under contention, from two host threads at once", "[kernels][simt]") {
  unsigned long long counter = 0;
  float sum = 0;
  int maximum = -1, lock = 0, guarded = 0;
  auto launch = [&] { TG_LAUNCH(count, 40, 256, 0, nullptr)(&counter, &sum, &maximum, &lock, &guarded); };
  std::thread other(launch);
  launch();
  other.join();
  CHECK(counter == 2ull * 40 * 256);
  CHECK(sum == 0.5f * 2 * 40 * 256);  // exact: every partial sum is a multiple of 0.5 below 2^24
  CHECK(maximum == 40 * 256 - 1);
  CHECK(guarded == 2 * 40);
  CHECK(lock == 0);
}

TEST_CASE("simt: dynamic shared memory and __dp4a", "[kernels][simt]") {
  std::vector<int> in(100);
  std::iota(in.begin(), in.end(), -20);
  int total = 0;
  TG_LAUNCH(dynamic_shared_sum, 1, 100, 100 * sizeof(int), nullptr)(in.data(), &total);
  CHECK(total == std::accumulate(in.begin(), in.end(), 0));

  auto pack = [](int a, int b, int c, int d) {
    return static_cast<int>(static_cast<std::uint8_t>(a) | static_cast<std::uint8_t>(b) << 8 |
                            static_cast<std::uint8_t>(c) << 16 | static_cast<std::uint32_t>(static_cast<std::uint8_t>(d)) << 24);
  };
  std::vector<int> a{pack(1, -2, 3, -128), pack(127, 127, -128, -128)};
  std::vector<int> b{pack(5, 6, -7, -1), pack(127, -1, -128, 1)};
  std::vector<int> out(2);
  TG_LAUNCH(dot4, 1, 2, 0, nullptr)(a.data(), b.data(), out.data());
  CHECK(out[0] == 7 + 5 - 12 - 21 + 128);
  CHECK(out[1] == 7 + 127 * 127 - 127 + 128 * 128 - 128);
}

// Stream capture, as the runtime's graphs use it: nothing runs while
// capturing; a launch keeps the arguments it had, a copy and a kernel read
// memory as it is when the graph runs, and the graph runs as often as launched.
TEST_CASE("simt: a captured graph replays its launches and copies with their arguments", "[kernels][simt]") {
  namespace emu = tollgate::kernels::emu;
  std::vector<float> data(40, 1.0f), add(40, 0.0f), host(40, 2.0f);
  float scale = 3.0f;
  emu::begin_capture(nullptr);
  emu::copy_to_device(add.data(), host.data(), host.size() * sizeof(float), nullptr);
  TG_LAUNCH(scale_add, 2, 32, 0, nullptr)(data.data(), add.data(), scale, 40);
  emu::Graph* graph = emu::end_capture(nullptr);
  scale = 100.0f;  // not the captured argument
  CHECK(data[0] == 1.0f);
  CHECK(add[0] == 0.0f);

  emu::launch_graph(graph, nullptr);
  CHECK(std::all_of(data.begin(), data.end(), [](float v) { return v == 1.0f * 3 + 2; }));
  std::fill(host.begin(), host.end(), 10.0f);  // read when the graph runs
  emu::launch_graph(graph, nullptr);
  CHECK(std::all_of(data.begin(), data.end(), [](float v) { return v == 5.0f * 3 + 10; }));
  emu::destroy_graph(graph);

  // The reference GEMM standing in for cuBLAS is host work: recorded too.
  namespace k = tollgate::kernels;
  std::vector<float> w(4 * 32, 0.5f), x(32 * 32, 1.0f), y(32 * 4, 0.0f);
  std::vector<std::uint8_t> workspace(k::gemm_workspace_bytes(k::Type::f32, 32, 4, 32));
  emu::begin_capture(nullptr);
  emu::gemm({w.data(), k::Type::f32, 4, 32, x.data(), 32, y.data(), workspace.data()}, nullptr);
  emu::Graph* product = emu::end_capture(nullptr);
  CHECK(y[0] == 0.0f);
  emu::launch_graph(product, nullptr);
  CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == 16.0f; }));
  emu::destroy_graph(product);

  // Outside a capture, launches run at once again; captures do not nest.
  TG_LAUNCH(scale_add, 2, 32, 0, nullptr)(data.data(), add.data(), 0.0f, 40);
  CHECK(data[39] == 10.0f);
  emu::begin_capture(nullptr);
  CHECK_THROWS_AS(emu::begin_capture(nullptr), std::logic_error);
  emu::destroy_graph(emu::end_capture(nullptr));
}

TEST_CASE("simt: a barrier some threads can never reach is reported", "[kernels][simt]") {
  std::vector<int> out(32);
  CHECK_THROWS_WITH(TG_LAUNCH(diverged, 1, 32, 0, nullptr)(out.data()),
                    Catch::Contains("cannot go on") && Catch::Contains("__syncthreads"));
}

TEST_CASE("simt: half and bfloat16 conversions round to nearest even", "[kernels][simt]") {
  CHECK(__float2half(1.0f).bits == 0x3c00);
  CHECK(__float2half(65504.0f).bits == 0x7bff);
  CHECK(__float2half(65520.0f).bits == 0x7c00);
  CHECK(__float2half(-0.0f).bits == 0x8000);
  CHECK(__float2half(1.0f + 0x1p-11f).bits == 0x3c00);               // a tie, to even
  CHECK(__float2half(1.0f + 3 * 0x1p-11f).bits == 0x3c02);           // a tie, to even (up)
  CHECK(__float2half(0x1p-24f).bits == 0x0001);                      // the smallest subnormal
  CHECK(__half2float(__float2half(0.1f)) == Approx(0.1f).epsilon(1e-3));
  CHECK(std::isnan(__half2float(__float2half(std::nanf("")))));
  CHECK(__float2bfloat16(1.0f).bits == 0x3f80);
  CHECK(__float2bfloat16(1.0f + 0x1p-8f).bits == 0x3f80);            // a tie, to even
  CHECK(__bfloat162float(__float2bfloat16(-2.5f)) == -2.5f);
  for (std::uint32_t h = 0; h < 0x7c00; h += 7) {  // every 7th finite half survives the round trip
    REQUIRE(__float2half(__half2float(__half{static_cast<std::uint16_t>(h)})).bits == h);
  }
}
