// The emulated device: host memory, launches that finish before they return.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

#include "kernels/runtime.hpp"
#include "kernels/simt/simt.hpp"

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
namespace {
// A copy now, or, while the thread records a capture, when the graph runs.
void copy(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  if (simt::recording()) {
    simt::record([=] { std::memmove(dst, src, bytes); });
  } else {
    std::memmove(dst, src, bytes);
  }
}
}  // namespace
void copy_on_device(void* dst, const void* src, std::size_t bytes, cudaStream_t) { copy(dst, src, bytes); }
void copy_to_device(void* dst, const void* src, std::size_t bytes, cudaStream_t) { copy(dst, src, bytes); }
void copy_to_host(void* dst, const void* src, std::size_t bytes, cudaStream_t) { copy(dst, src, bytes); }
void synchronize(cudaStream_t) {}

void* host_alloc(std::size_t bytes) { return device_alloc(bytes); }
void host_free(void* p) { device_free(p); }

// A graph is the thread's recording: the emulation has one stream per thread.
struct Graph {
  simt::Recording work;
};
namespace {
thread_local std::unique_ptr<Graph> capturing;
}  // namespace
void begin_capture(cudaStream_t) {
  if (capturing) throw std::logic_error("begin_capture: this thread captures already");
  capturing = std::make_unique<Graph>();
  simt::begin_recording(capturing->work);
}
Graph* end_capture(cudaStream_t) {
  if (!capturing) throw std::logic_error("end_capture without begin_capture");
  simt::end_recording();
  return capturing.release();
}
void launch_graph(Graph* graph, cudaStream_t) {
  if (simt::recording()) throw std::logic_error("launch_graph while capturing");
  for (const auto& work : graph->work) work();
}
void destroy_graph(Graph* graph) { delete graph; }

}  // namespace tollgate::kernels::emu
