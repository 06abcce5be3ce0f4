// The CUDA runtime behind kernels/runtime.hpp (built only by nvcc).
#include <stdexcept>

#include "kernels/common.cuh"
#include "kernels/runtime.hpp"

namespace tollgate::kernels::cuda {
namespace {
void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}
}  // namespace

bool device_available(std::string& why) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    why = std::string("the CUDA runtime found no usable driver or device (") + cudaGetErrorString(error) + ")";
    cudaGetLastError();  // clears the sticky error
    return false;
  }
  if (count == 0) {
    why = "no CUDA device is present";
    return false;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  if (prop.major < 8) {
    why = std::string(prop.name) + " has compute capability " + std::to_string(prop.major) + "." +
          std::to_string(prop.minor) + "; the kernels are built for 8.0 and 9.0";
    return false;
  }
  return true;
}

std::string device_name() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return prop.name;
}

DeviceInfo device_info() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  DeviceInfo info;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.total_memory = prop.totalGlobalMem;
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, 0) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0) == cudaSuccess) {
    // Double data rate: two transfers a clock.
    info.peak_bandwidth = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0);
  }
  cudaGetLastError();
  return info;
}

bool memory_info(std::size_t& free, std::size_t& total) {
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return true;
}

cudaStream_t create_stream() {
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  return stream;
}

void destroy_stream(cudaStream_t stream) {
  if (stream != nullptr) cudaStreamDestroy(stream);
}

void* device_alloc(std::size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");
  return p;
}
void device_free(void* p) { cudaFree(p); }
void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
}
void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
}
void copy_on_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
}

void synchronize(cudaStream_t stream) {
  check(cudaGetLastError(), "a kernel launch");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

void* host_alloc(std::size_t bytes) {
  void* p = nullptr;
  check(cudaMallocHost(&p, bytes == 0 ? 1 : bytes), "cudaMallocHost");
  return p;
}
void host_free(void* p) { cudaFreeHost(p); }

struct Graph {
  cudaGraphExec_t exec = nullptr;
};

// Relaxed: a buffer that must grow during the capture may still be
// allocated (the caller frees the old one only after the capture).
void begin_capture(cudaStream_t stream) {
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
}

Graph* end_capture(cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  if (ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    check(ended, "cudaStreamEndCapture");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check(instantiated, "cudaGraphInstantiate");
  return new Graph{exec};
}

void launch_graph(Graph* graph, cudaStream_t stream) { check(cudaGraphLaunch(graph->exec, stream), "cudaGraphLaunch"); }

void destroy_graph(Graph* graph) {
  if (graph == nullptr) return;
  cudaGraphExecDestroy(graph->exec);
  delete graph;
}

}  // namespace tollgate::kernels::cuda
