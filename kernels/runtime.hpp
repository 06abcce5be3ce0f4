// Device memory and streams for each build of the kernels: tollgate::kernels::cuda
// (the CUDA runtime, built only when nvcc is found) and ::emu (host memory;
// a launch runs at once, so synchronising does nothing). Host code uses these
// instead of the CUDA runtime, so it compiles without CUDA headers.
#pragma once

#include <cstddef>
#include <string>

#include "kernels/types.hpp"

namespace tollgate::kernels {

TG_KERNEL_API(
    // Whether a usable device is present; when not, why (no driver, no
    // device, a device too old for the compiled architectures ...).
    bool device_available(std::string& why))
TG_KERNEL_API(std::string device_name())
// What the bench reports against: the device's size and peak memory bandwidth.
struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int multiprocessors = 0;
  std::size_t total_memory = 0;
  double peak_bandwidth = 0;  // bytes/s, from the memory clock and bus width; 0 when unknown
};
TG_KERNEL_API(DeviceInfo device_info())
// Free and total device memory; false for the emulation (host memory).
TG_KERNEL_API(bool memory_info(std::size_t& free, std::size_t& total))
TG_KERNEL_API(cudaStream_t create_stream())
TG_KERNEL_API(void destroy_stream(cudaStream_t stream))
TG_KERNEL_API(void* device_alloc(std::size_t bytes))  // throws std::runtime_error when out of memory
TG_KERNEL_API(void device_free(void* p))
TG_KERNEL_API(void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream))
TG_KERNEL_API(void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t stream))
TG_KERNEL_API(void copy_on_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream))
TG_KERNEL_API(void synchronize(cudaStream_t stream))  // throws std::runtime_error on a kernel's failure

// Page-locked host memory: copies to and from it are truly asynchronous (and
// may be captured). Throws std::runtime_error when none is left.
TG_KERNEL_API(void* host_alloc(std::size_t bytes))
TG_KERNEL_API(void host_free(void* p))

// Stream capture into an executable graph (CUDA graphs). Between
// begin_capture and end_capture the launches and copies on `stream` are
// recorded, not run; launch_graph runs them again with the arguments they had
// when recorded, so whatever changes between launches must be read from
// device memory. The emulation records the calling thread's launches and
// copies (simt::Recording). end_capture throws std::runtime_error when the
// capture failed; the stream has left capture mode either way.
TG_KERNEL_API(struct Graph)
TG_KERNEL_API(void begin_capture(cudaStream_t stream))
TG_KERNEL_API(Graph* end_capture(cudaStream_t stream))
TG_KERNEL_API(void launch_graph(Graph* graph, cudaStream_t stream))
TG_KERNEL_API(void destroy_graph(Graph* graph))

}  // namespace tollgate::kernels
