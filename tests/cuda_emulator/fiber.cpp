#include "fiber.h"
#include "sanitizer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>


namespace cuda_emulator::detail {
namespace {

#ifdef CUDA_EMULATOR_ASAN
void start_switch(void** fake_stack, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
void finish_switch(void* fake_stack, const void** bottom, size_t* size) {
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
}
#else
void start_switch(void**, const void*, size_t) {}
void finish_switch(void*, const void**, size_t*) {}
#endif

size_t page_bytes() {
  static const size_t bytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return bytes;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s\n", what);
  std::abort();
}

} // namespace
} // namespace cuda_emulator::detail

#if defined(__x86_64__)
// switch(save_sp, load_sp): pushes the callee-saved registers and the x87 /
// SSE control words, stores the stack pointer in *save_sp, and pops the same
// from load_sp. A new fiber's stack is laid out as if it had called switch
// from cuda_emulator_fiber_entry, which calls r13(r12).
extern "C" void cuda_emulator_switch(void** save_sp, void* load_sp);
extern "C" void cuda_emulator_fiber_entry();
asm(R"(
  .text
  .p2align 4
  .globl cuda_emulator_switch
  .hidden cuda_emulator_switch
  .type cuda_emulator_switch,@function
cuda_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulator_switch, .-cuda_emulator_switch

  .p2align 4
  .globl cuda_emulator_fiber_entry
  .hidden cuda_emulator_fiber_entry
  .type cuda_emulator_fiber_entry,@function
cuda_emulator_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cuda_emulator_fiber_entry, .-cuda_emulator_fiber_entry
)");
#endif

namespace cuda_emulator::detail {

size_t Fiber::stack_bytes() {
#ifdef CUDA_EMULATOR_ASAN
  return size_t{256} << 10;
#else
  return size_t{64} << 10;
#endif
}

Fiber::~Fiber() {
  if (!stack_) return;
  unregister_guard_page(static_cast<char*>(stack_) - page_bytes());
  munmap(static_cast<char*>(stack_) - page_bytes(), stack_size_ + page_bytes());
}

void Fiber::trampoline(Fiber* self) {
  finish_switch(nullptr, &self->caller_stack_bottom_, &self->caller_stack_size_);
  self->entry_(self->arg_);
  fail("a fiber's entry returned");
}

void Fiber::start(Entry entry, void* arg) {
  if (!stack_) {
    stack_size_ = stack_bytes();
    const size_t guard = page_bytes();
    void* region = mmap(nullptr, stack_size_ + guard, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) fail("cannot map a fiber stack");
    if (mprotect(region, guard, PROT_NONE) != 0) fail("cannot protect a fiber stack's guard page");
    register_guard_page(region, "a GPU thread overflowed its fiber stack (Fiber::stack_bytes)");
    stack_ = static_cast<char*>(region) + guard;
  }
  entry_ = entry;
  arg_ = arg;
#if defined(__x86_64__)
  // The frame cuda_emulator_switch pops: control words, r15..r12, rbx, rbp,
  // return address; the entry then calls with a 16-byte aligned stack.
  auto top = reinterpret_cast<uintptr_t>(stack_) + stack_size_;
  auto* frame = reinterpret_cast<uint64_t*>(top - 88);
  frame[0] = 0x037f;                                        // x87 control word
  frame[1] = 0x1f80;                                        // MXCSR
  frame[2] = 0;                                             // r15
  frame[3] = 0;                                             // r14
  frame[4] = reinterpret_cast<uint64_t>(&Fiber::trampoline); // r13: called
  frame[5] = reinterpret_cast<uint64_t>(this);              // r12: its argument
  frame[6] = 0;                                             // rbx
  frame[7] = 0;                                             // rbp
  frame[8] = reinterpret_cast<uint64_t>(&cuda_emulator_fiber_entry);
  fiber_sp_ = frame;
#else
  if (getcontext(&fiber_context_) != 0) fail("getcontext failed");
  fiber_context_.uc_stack.ss_sp = stack_;
  fiber_context_.uc_stack.ss_size = stack_size_;
  fiber_context_.uc_link = nullptr;
  makecontext(&fiber_context_, reinterpret_cast<void (*)()>(&Fiber::trampoline), 1, this);
#endif
}

void Fiber::resume() {
  void* fake_stack = nullptr;
  start_switch(&fake_stack, stack_, stack_size_);
#if defined(__x86_64__)
  cuda_emulator_switch(&caller_sp_, fiber_sp_);
#else
  if (swapcontext(&caller_context_, &fiber_context_) != 0) fail("swapcontext failed");
#endif
  finish_switch(fake_stack, nullptr, nullptr);
}

void Fiber::suspend() {
  start_switch(&fake_stack_, caller_stack_bottom_, caller_stack_size_);
#if defined(__x86_64__)
  cuda_emulator_switch(&fiber_sp_, caller_sp_);
#else
  if (swapcontext(&fiber_context_, &caller_context_) != 0) fail("swapcontext failed");
#endif
  finish_switch(fake_stack_, &caller_stack_bottom_, &caller_stack_size_);
}

} // namespace cuda_emulator::detail
