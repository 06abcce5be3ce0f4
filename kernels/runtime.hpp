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
TG_KERNEL_API(void* device_alloc(std::size_t bytes))  // throws std::runtime_error when out of memory
TG_KERNEL_API(void device_free(void* p))
TG_KERNEL_API(void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream))
TG_KERNEL_API(void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t stream))
TG_KERNEL_API(void synchronize(cudaStream_t stream))  // throws std::runtime_error on a kernel's failure

}  // namespace tollgate::kernels
