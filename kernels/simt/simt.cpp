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

// Switching fibers: on x86-64 and arm64 a few instructions that save the
// callee-saved registers on the old stack and restore them from the new one
// (swapcontext also saves the signal mask: a system call each way, which made
// it the emulation's largest cost); ucontext elsewhere.
#if defined(__x86_64__) || defined(__aarch64__)
#define SIMT_FAST_SWITCH 1
extern "C" void simt_switch_stack(void** save_sp, void* load_sp);
#if defined(__x86_64__)
asm(R"(
  .text
  .globl simt_switch_stack
  .type simt_switch_stack, @function
simt_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_stack, .-simt_switch_stack
)");
constexpr std::size_t kSavedWords = 6;  // below the return address
#else
asm(R"(
  .text
  .globl simt_switch_stack
  .type simt_switch_stack, %function
simt_switch_stack:
  sub sp, sp, #160
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x2, sp
  str x2, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #160
  ret
  .size simt_switch_stack, .-simt_switch_stack
)");
#endif
#endif

enum class State { runnable, block_barrier, warp_barrier, done };

struct Fiber {
#ifdef SIMT_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t context{};
#endif
  void* stack = nullptr;  // the usable part, above the guard page
  dim3 thread_idx;
  int linear = 0;
  State state = State::runnable;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

struct Warp {
  std::uint64_t slots[kWarpSize] = {};
};

// The stacks of a launching host thread, mapped once (guard pages and all)
// and reused by every later launch on it.
class Stacks {
 public:
  ~Stacks() {
    if (mapping_ != nullptr) munmap(mapping_, count_ * (kStackBytes + page_));
  }
  char* stack(std::size_t i) { return mapping_ + i * (kStackBytes + page_) + page_; }
  void reserve(std::size_t count) {
    if (count <= count_) return;
    if (mapping_ != nullptr) munmap(mapping_, count_ * (kStackBytes + page_));
    mapping_ = nullptr;
    count_ = 0;
    page_ = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* mapping = mmap(nullptr, count * (kStackBytes + page_), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) throw std::bad_alloc();
    mapping_ = static_cast<char*>(mapping);
    count_ = count;
    for (std::size_t i = 0; i < count; ++i) mprotect(mapping_ + i * (kStackBytes + page_), page_, PROT_NONE);
  }

 private:
  char* mapping_ = nullptr;
  std::size_t count_ = 0;
  std::size_t page_ = 4096;
};

thread_local Stacks stacks;

class Block;
thread_local Block* running = nullptr;

class Block {
 public:
  Block(dim3 grid, dim3 block, std::size_t shared_bytes)
      : grid_(grid), block_(block), shared_(shared_bytes == 0 ? 1 : shared_bytes) {
    const std::size_t threads = std::size_t{block.x} * block.y * block.z;
    if (threads == 0 || threads > kMaxThreadsPerBlock) {
      throw std::invalid_argument("simt: a block of " + std::to_string(threads) + " threads (1 to 1024)");
    }
    fibers_.resize(threads);
    warps_.resize((threads + kWarpSize - 1) / kWarpSize);
    // Always room for a full block: a later, larger launch does not remap.
    stacks.reserve(kMaxThreadsPerBlock / 4 > threads ? kMaxThreadsPerBlock / 4 : threads);
    for (std::size_t i = 0; i < threads; ++i) {
      auto& f = fibers_[i];
      f.stack = stacks.stack(i);
      f.linear = static_cast<int>(i);
      f.thread_idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                          static_cast<unsigned>(i / (std::size_t{block.x} * block.y)));
    }
  }
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
  // Where every fiber starts; it never returns (its last act is to switch away).
  static void entry() {
    Block* self = running;
    Fiber& f = *self->current_;
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &self->scheduler_bottom_, &self->scheduler_size_);
#endif
    (*self->body_)();
    f.state = State::done;
    self->switch_to_scheduler(f, true);
    std::abort();  // a finished fiber is never resumed
  }
#ifndef SIMT_FAST_SWITCH
  static void entry_ucontext() { entry(); }
#endif

  void start(Fiber& f) {
    f.state = State::runnable;
#ifdef SIMT_FAST_SWITCH
    // The frame simt_switch_stack pops: saved registers (zero), then the
    // address it returns to. The stack is 16-byte aligned as a call leaves it.
    auto top = reinterpret_cast<std::uintptr_t>(f.stack) + kStackBytes;
    top &= ~std::uintptr_t{15};
    auto* words = reinterpret_cast<void**>(top);
#if defined(__x86_64__)
    *--words = nullptr;                                     // entry's (never used) return address
    *--words = reinterpret_cast<void*>(&Block::entry);      // where simt_switch_stack returns
    for (std::size_t i = 0; i < kSavedWords; ++i) *--words = nullptr;
#else
    words -= 20;  // 160 bytes: x19..x28, x29, x30 (= entry), d8..d15
    for (int i = 0; i < 20; ++i) words[i] = nullptr;
    words[11] = reinterpret_cast<void*>(&Block::entry);
#endif
    f.sp = words;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, &Block::entry_ucontext, 0);
#endif
  }

  void switch_to_scheduler(Fiber& f, bool finished) {
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, scheduler_bottom_, scheduler_size_);
#else
    (void)finished;
#endif
#ifdef SIMT_FAST_SWITCH
    simt_switch_stack(&f.sp, scheduler_sp_);
#else
    swapcontext(&f.context, &scheduler_);
#endif
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
#ifdef SIMT_FAST_SWITCH
    simt_switch_stack(&scheduler_sp_, f.sp);
#else
    swapcontext(&scheduler_, &f.context);
#endif
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    current_ = nullptr;
  }

  void run_block() {
    for (auto& f : fibers_) start(f);
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
#ifdef SIMT_FAST_SWITCH
  void* scheduler_sp_ = nullptr;
#else
  ucontext_t scheduler_{};
#endif
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  const void* scheduler_bottom_ = nullptr;
  std::size_t scheduler_size_ = 0;
};



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

namespace {
thread_local Recording* recording_into = nullptr;
}  // namespace

void run(const std::function<void()>& body, dim3 grid, dim3 block_shape, std::size_t shared_bytes) {
  if (running) throw std::logic_error("simt: a launch inside a kernel");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (recording_into != nullptr) {
    recording_into->push_back([body, grid, block_shape, shared_bytes] { run(body, grid, block_shape, shared_bytes); });
    return;
  }
  Block b(grid, block_shape, shared_bytes);
  running = &b;
  struct Reset {
    ~Reset() { running = nullptr; }
  } reset;
  b.run(body);
}

}  // namespace simt::detail

namespace simt {

void begin_recording(Recording& into) {
  if (detail::recording_into != nullptr) throw std::logic_error("simt: this thread records already");
  detail::recording_into = &into;
}
void end_recording() { detail::recording_into = nullptr; }
bool recording() { return detail::recording_into != nullptr; }
void record(std::function<void()> work) {
  if (detail::recording_into == nullptr) throw std::logic_error("simt: record() while not recording");
  detail::recording_into->push_back(std::move(work));
}

}  // namespace simt

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
