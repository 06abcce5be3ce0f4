// The emulated device: host memory, launches that finish before they return.
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels/runtime.hpp"

namespace tollgate::kernels::emu {

bool device_available(std::string&) { return true; }
std::string device_name() { return "SIMT emulation on the host"; }
void* device_alloc(std::size_t bytes) {
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (!p) throw std::bad_alloc();
  return p;
}
void device_free(void* p) { std::free(p); }
void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void synchronize(cudaStream_t) {}

}  // namespace tollgate::kernels::emu
