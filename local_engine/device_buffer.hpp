// Memory a device owns: a pointer in the device's address space (host memory
// for the CPU device), freed by the device's own function when the buffer goes.
#pragma once

#include <cstddef>
#include <utility>

namespace tollgate::local_engine {

class DeviceBuffer {
 public:
  using Free = void (*)(void*);
  DeviceBuffer() = default;
  DeviceBuffer(void* p, std::size_t bytes, Free free) : p_(p), bytes_(bytes), free_(free) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), free_(o.free_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      free_ = o.free_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* get() const { return p_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void reset() {
    if (p_ != nullptr && free_ != nullptr) free_(p_);
    p_ = nullptr;
  }
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
  Free free_ = nullptr;
};

// Plain host memory, 64-byte aligned and not zeroed (untouched pages of a
// large buffer cost nothing). Throws std::bad_alloc.
DeviceBuffer host_buffer(std::size_t bytes);

}  // namespace tollgate::local_engine
