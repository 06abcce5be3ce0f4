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
DeviceInfo device_info() { return {device_name(), 0, 0, 1, 0, 0}; }
bool memory_info(std::size_t&, std::size_t&) { return false; }
cudaStream_t create_stream() { return nullptr; }
void destroy_stream(cudaStream_t) {}
void copy_on_device(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes) std::memmove(dst, src, bytes);
}
void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void synchronize(cudaStream_t) {}

}  // namespace tollgate::kernels::emu
