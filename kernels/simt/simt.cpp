// The emulation's scheduler: one fiber per thread of a block (ucontext), run
// in a fixed order until each reaches a barrier; a barrier releases when every
// live thread it waits for has arrived.
#include "kernels/simt/simt.hpp"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#ifdef SIMT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace simt::detail {
namespace {

// A fiber's stack: kernels keep small arrays in registers, i.e. here on the
// stack; sanitizers make frames several times larger. Untouched pages cost no
// memory, and a guard page below each stack turns an overflow into a fault.
#ifdef SIMT_ASAN
constexpr std::size_t kStackBytes = 512 * 1024;
#else
constexpr std::size_t kStackBytes = 128 * 1024;
#endif
constexpr int kMaxThreadsPerBlock = 1024;

enum class State { runnable, block_barrier, warp_barrier, done };

struct Fiber {
  ucontext_t context{};
  void* stack = nullptr;  // the usable part, above the guard page
  dim3 thread_idx;
  int linear = 0;
  State state = State::runnable;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

struct Warp {
  std::uint64_t slots[kWarpSize] = {};
};

class Block {
 public:
  Block(dim3 grid, dim3 block, std::size_t shared_bytes)
      : grid_(grid), block_(block), shared_(shared_bytes == 0 ? 1 : shared_bytes) {
    const std::size_t threads = std::size_t{block.x} * block.y * block.z;
    if (threads == 0 || threads > kMaxThreadsPerBlock) {
      throw std::invalid_argument("simt: a block of " + std::to_string(threads) + " threads (1 to 1024)");
    }
    page_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    fibers_.resize(threads);
    warps_.resize((threads + kWarpSize - 1) / kWarpSize);
    mapping_bytes_ = threads * (kStackBytes + page_);
    void* mapping = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
    if (mapping == MAP_FAILED) throw std::bad_alloc();
    mapping_ = static_cast<char*>(mapping);
    for (std::size_t i = 0; i < threads; ++i) {
      char* base = mapping_ + i * (kStackBytes + page_);
      mprotect(base, page_, PROT_NONE);
      auto& f = fibers_[i];
      f.stack = base + page_;
      f.linear = static_cast<int>(i);
      f.thread_idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                          static_cast<unsigned>(i / (std::size_t{block.x} * block.y)));
    }
  }
  ~Block() { munmap(mapping_, mapping_bytes_); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  void run(const std::function<void()>& body) {
    body_ = &body;
    for (unsigned z = 0; z < grid_.z; ++z) {
      for (unsigned y = 0; y < grid_.y; ++y) {
        for (unsigned x = 0; x < grid_.x; ++x) {
          block_idx_ = dim3(x, y, z);
          run_block();
        }
      }
    }
  }

  // Called on the running fiber.
  void wait(State barrier) {
    current_->state = barrier;
    switch_to_scheduler(*current_, false);
  }
  Fiber& current() { return *current_; }
  Warp& warp_of(const Fiber& f) { return warps_[static_cast<std::size_t>(f.linear / kWarpSize)]; }
  std::uint32_t live_lanes(const Fiber& f) const {
    std::uint32_t mask = 0;
    std::size_t first = static_cast<std::size_t>(f.linear / kWarpSize) * kWarpSize;
    for (std::size_t i = first; i < first + kWarpSize && i < fibers_.size(); ++i) {
      if (fibers_[i].state != State::done) mask |= 1u << (i - first);
    }
    return mask;
  }

  const dim3& block_idx() const { return block_idx_; }
  const dim3& block_dim() const { return block_; }
  const dim3& grid_dim() const { return grid_; }
  void* dynamic_shared() { return shared_.data(); }

 private:
  static void entry(unsigned high, unsigned low) {
    auto* self = reinterpret_cast<Block*>((static_cast<std::uintptr_t>(high) << 32) | low);
    Fiber& f = *self->current_;
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &self->scheduler_bottom_, &self->scheduler_size_);
#endif
    (*self->body_)();
    f.state = State::done;
    self->switch_to_scheduler(f, true);
  }

  void switch_to_scheduler(Fiber& f, bool finished) {
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, scheduler_bottom_, scheduler_size_);
#else
    (void)finished;
#endif
    swapcontext(&f.context, &scheduler_);
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &scheduler_bottom_, &scheduler_size_);
#endif
  }

  void resume(Fiber& f) {
    current_ = &f;
#ifdef SIMT_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
    swapcontext(&scheduler_, &f.context);
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    current_ = nullptr;
  }

  void run_block() {
    auto self = reinterpret_cast<std::uintptr_t>(this);
    for (auto& f : fibers_) {
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, reinterpret_cast<void (*)()>(&Block::entry), 2, static_cast<unsigned>(self >> 32),
                  static_cast<unsigned>(self & 0xffffffffu));
      f.state = State::runnable;
    }
    for (;;) {
      bool ran = false;
      for (auto& f : fibers_) {
        if (f.state != State::runnable) continue;
        resume(f);
        ran = true;
      }
      if (ran) continue;
      if (release()) continue;
      return;  // every fiber is done
    }
  }

  // Releases the barriers every live thread has reached; false when all are
  // done. A barrier no thread can release is a kernel bug: reported.
  bool release() {
    std::size_t live = 0, at_block = 0;
    for (const auto& f : fibers_) {
      if (f.state == State::done) continue;
      ++live;
      if (f.state == State::block_barrier) ++at_block;
    }
    if (live == 0) return false;
    if (at_block == live) {
      for (auto& f : fibers_) {
        if (f.state == State::block_barrier) f.state = State::runnable;
      }
      return true;
    }
    bool released = false;
    for (std::size_t first = 0; first < fibers_.size(); first += kWarpSize) {
      std::size_t end = std::min(fibers_.size(), first + kWarpSize);
      bool all = true, any = false;
      for (std::size_t i = first; i < end; ++i) {
        if (fibers_[i].state == State::done) continue;
        any = true;
        if (fibers_[i].state != State::warp_barrier) all = false;
      }
      if (!any || !all) continue;
      for (std::size_t i = first; i < end; ++i) {
        if (fibers_[i].state == State::warp_barrier) fibers_[i].state = State::runnable;
      }
      released = true;
    }
    if (released) return true;
    throw std::logic_error("simt: block (" + std::to_string(block_idx_.x) + "," + std::to_string(block_idx_.y) + "," +
                           std::to_string(block_idx_.z) + ") cannot go on: " + std::to_string(at_block) + " of " +
                           std::to_string(live) +
                           " live threads wait at __syncthreads while the others wait at a warp barrier");
  }

  dim3 grid_, block_, block_idx_;
  std::vector<std::byte> shared_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  std::size_t page_ = 4096;
  char* mapping_ = nullptr;
  std::size_t mapping_bytes_ = 0;
  ucontext_t scheduler_{};
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  const void* scheduler_bottom_ = nullptr;
  std::size_t scheduler_size_ = 0;
};

thread_local Block* running = nullptr;

Block& block() {
  if (!running) std::abort();  // a device function called outside a launch
  return *running;
}

}  // namespace

const dim3& thread_idx() { return block().current().thread_idx; }
const dim3& block_idx() { return block().block_idx(); }
const dim3& block_dim() { return block().block_dim(); }
const dim3& grid_dim() { return block().grid_dim(); }
int lane_id() { return block().current().linear % kWarpSize; }
void* dynamic_shared() { return block().dynamic_shared(); }

void syncthreads() { block().wait(State::block_barrier); }
void syncwarp() { block().wait(State::warp_barrier); }

std::uint64_t warp_exchange(std::uint64_t value, int src) {
  auto& b = block();
  auto& warp = b.warp_of(b.current());
  warp.slots[lane_id()] = value;
  b.wait(State::warp_barrier);
  std::uint64_t got = warp.slots[src & (kWarpSize - 1)];
  b.wait(State::warp_barrier);
  return got;
}

std::uint32_t warp_ballot(bool predicate) {
  auto& b = block();
  auto& warp = b.warp_of(b.current());
  warp.slots[lane_id()] = predicate ? 1 : 0;
  b.wait(State::warp_barrier);
  std::uint32_t live = b.live_lanes(b.current());
  std::uint32_t mask = 0;
  for (int i = 0; i < kWarpSize; ++i) {
    if ((live >> i & 1u) && warp.slots[i]) mask |= 1u << i;
  }
  b.wait(State::warp_barrier);
  return mask;
}

void run(const std::function<void()>& body, dim3 grid, dim3 block_shape, std::size_t shared_bytes) {
  if (running) throw std::logic_error("simt: a launch inside a kernel");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  Block b(grid, block_shape, shared_bytes);
  running = &b;
  struct Reset {
    ~Reset() { running = nullptr; }
  } reset;
  b.run(body);
}

}  // namespace simt::detail

__half __float2half(float f) {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  std::uint32_t sign = (bits >> 16) & 0x8000u;
  std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf or nan
    return {static_cast<std::uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u))};
  }
  if (magnitude >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (magnitude < 0x38800000u) {  // a subnormal half (or zero): round at 2^-24
    float scaled = std::bit_cast<float>(magnitude) * 0x1p24f;
    auto q = static_cast<std::uint32_t>(std::nearbyint(scaled));
    return {static_cast<std::uint16_t>(sign | q)};
  }
  std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return {static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

__nv_bfloat16 __float2bfloat16(float f) {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<std::uint16_t>(bits >> 16)};
}
