// Which device runs the engine: by name, with the reason logged.
#include <stdexcept>

#include "kernels/runtime.hpp"
#include "local_engine/device.hpp"

namespace tollgate::local_engine {

// gpu_device.cpp, built once per kernel build.
std::unique_ptr<Device> make_gpu_device_emu();
#ifdef TOLLGATE_WITH_CUDA
std::unique_ptr<Device> make_gpu_device_cuda();
#endif

bool cuda_device_available(std::string& why) {
#ifdef TOLLGATE_WITH_CUDA
  try {
    return kernels::cuda::device_available(why);
  } catch (const std::exception& e) {
    why = e.what();
    return false;
  }
#else
  why = "this build has no CUDA device code (nvcc was not found when it was configured)";
  return false;
#endif
}

double cuda_peak_bandwidth() {
  std::string why;
  if (!cuda_device_available(why)) return 0;
#ifdef TOLLGATE_WITH_CUDA
  return kernels::cuda::device_info().peak_bandwidth;
#else
  return 0;
#endif
}

std::unique_ptr<Device> make_cuda_device() {
#ifdef TOLLGATE_WITH_CUDA
  return make_gpu_device_cuda();
#else
  std::string why;
  cuda_device_available(why);
  throw std::runtime_error(why);
#endif
}

std::unique_ptr<Device> make_emulated_cuda_device() { return make_gpu_device_emu(); }

std::unique_ptr<Device> make_device(const std::string& name, int cpu_threads, std::string& why) {
  if (name == "cpu") {
    why = "device: cpu";
    return make_cpu_device(cpu_threads);
  }
  if (name == "cuda-emulated") {
    why = "device: cuda-emulated (the CUDA kernels through the SIMT emulation on the host; for tests, slow)";
    return make_emulated_cuda_device();
  }
  if (name != "cuda" && name != "auto") {
    throw std::invalid_argument("unknown device '" + name + "' (expected auto, cpu, cuda or cuda-emulated)");
  }
  std::string absent;
  if (cuda_device_available(absent)) {
    auto device = make_cuda_device();
    why = "device: " + name + " -> " + device->name();
    return device;
  }
  if (name == "cuda") throw std::runtime_error("device: cuda, but " + absent);
  why = "device: auto -> cpu (" + absent + ")";
  return make_cpu_device(cpu_threads);
}

}  // namespace tollgate::local_engine
