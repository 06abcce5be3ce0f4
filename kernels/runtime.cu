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
void synchronize(cudaStream_t stream) {
  check(cudaGetLastError(), "a kernel launch");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

}  // namespace tollgate::kernels::cuda
