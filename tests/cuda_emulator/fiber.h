// Cooperative fibers for the CUDA executor: a stack of its own per fiber,
// and a switch that saves only what the calling convention says survives a
// call. On x86-64 the switch is a few instructions (no system call), since a
// launch switches once per thread and synchronization point; elsewhere it is
// glibc's swapcontext. AddressSanitizer is told of every stack switch.
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emulator::detail {

// Names a page without access (runtime.cpp): a fault there is reported as
// `what` before the process's own fault handling runs.
void register_guard_page(const void* page, const char* what);
void unregister_guard_page(const void* page);

class Fiber {
 public:
  using Entry = void (*)(void* arg);

  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber();

  // (Re)starts the fiber at entry(arg) on its stack (allocated on first use);
  // it runs at the next resume().
  void start(Entry entry, void* arg);
  // Runs the fiber until it calls suspend() (or its entry returns, which it
  // must not: entries end by suspending for good).
  void resume();
  // Called on the fiber: back to whoever resumed it.
  void suspend();

  // Stack size per fiber; a guard page below it turns an overflow into a fault.
  static size_t stack_bytes();

 private:
  static void trampoline(Fiber* self);

  void* stack_ = nullptr;  // lowest address of the usable stack
  size_t stack_size_ = 0;
  Entry entry_ = nullptr;
  void* arg_ = nullptr;
  // Sanitizer bookkeeping of the stack being left.
  void* fake_stack_ = nullptr;
  const void* caller_stack_bottom_ = nullptr;
  size_t caller_stack_size_ = 0;
#if defined(__x86_64__)
  void* fiber_sp_ = nullptr;
  void* caller_sp_ = nullptr;
#else
  ucontext_t fiber_context_{};
  ucontext_t caller_context_{};
#endif
};

} // namespace cuda_emulator::detail
