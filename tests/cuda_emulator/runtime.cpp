// The executor behind cuda_emulator.h: grids, blocks of fibers, barriers and
// warp collectives, and the few runtime API calls the kernels' launchers make.
//
// A block runs on one OS thread. Its scheduler resumes every runnable thread
// in schedule order; each runs until it parks (barrier, warp collective) or
// returns. When none is runnable, the scheduler completes the warp
// collectives whose every named lane has arrived, else releases the barrier
// when every live thread waits there, else reports what is stuck: that is a
// kernel a GPU would hang on, or run with undefined results.
#include "cuda_emulator.h"
#include "fiber.h"
#include "sanitizer.h"

#include <omp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>


namespace cuda_emulator {
namespace detail {

thread_local uint3 thread_idx;
thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;
thread_local unsigned char* dynamic_shared = nullptr;

namespace {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int kDefaultDynamicSharedBytes = 48 << 10;
// H100: 227 KiB of shared memory per block with opt-in.
constexpr int kOptinSharedBytes = 232448;

std::atomic<Schedule> g_schedule{Schedule::ascending};

std::mutex g_mutex;                               // guards the three below
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncSetAttribute
std::map<const void*, int64_t> g_launch_counts;
std::string g_last_failure;

enum class State { runnable, at_barrier, at_warp_op, exited };

// Guard pages and what a fault in each means. A fault handler may only read
// plain atomics: a fixed table, scanned linearly.
constexpr int kMaxGuardPages = 1 << 14;
std::atomic<uintptr_t> g_guard_pages[kMaxGuardPages];
std::atomic<const char*> g_guard_meaning[kMaxGuardPages];
struct sigaction g_previous_segv_action;

void on_segv(int signal, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < kMaxGuardPages; ++i) {
    const uintptr_t begin = g_guard_pages[i].load(std::memory_order_relaxed);
    if (begin != 0 && address >= begin && address < begin + page) {
      const char* prefix = "cuda_emulator: ";
      const char* meaning = g_guard_meaning[i].load(std::memory_order_relaxed);
      const char* what = meaning ? meaning : "an access to a guard page";
      (void)!write(STDERR_FILENO, prefix, std::strlen(prefix));
      (void)!write(STDERR_FILENO, what, std::strlen(what));
      (void)!write(STDERR_FILENO, "\n", 1);
      break;
    }
  }
  // Hand the fault to whatever handled it before (Python's faulthandler, or
  // the default action), as if this handler had not been there.
  sigaction(SIGSEGV, &g_previous_segv_action, nullptr);
  (void)signal;
  (void)context;
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = &on_segv;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &g_previous_segv_action);
  });
}

struct Thread {
  Fiber fiber;
  State state = State::runnable;
  uint3 index{};
  int lane = 0;
  // At a warp collective: what it asked.
  WarpOp op{};
  unsigned mask = 0;
  int size = 0;
  int lane_arg = 0;
  int width = 0;
  int predicate = 0;
  alignas(16) unsigned char value[16];
  void* result = nullptr;
  unsigned* vote = nullptr;
};

// Dynamic shared memory of the blocks an OS thread runs. Outside a sanitizer
// build the bytes end at a page without access, so that an access past the
// launch's size faults; with AddressSanitizer the allocation has exactly the
// launch's size, and its redzone reports the access.
class SharedMemory {
 public:
  ~SharedMemory() { release(); }

  unsigned char* reset(size_t bytes) {
#ifdef CUDA_EMULATOR_ASAN
    release();
    const size_t rounded = std::max<size_t>(16, (bytes + 15) / 16 * 16);
    base_ = static_cast<unsigned char*>(std::aligned_alloc(16, rounded));
    if (rounded > bytes) ASAN_POISON_MEMORY_REGION(base_ + bytes, rounded - bytes);
    begin_ = base_;
#else
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t needed = (bytes + page - 1) / page * page + page;
    if (needed > mapped_) {
      release();
      void* region = mmap(nullptr, needed, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (region == MAP_FAILED) return nullptr;
      base_ = static_cast<unsigned char*>(region);
      mapped_ = needed;
      mprotect(base_ + mapped_ - page, page, PROT_NONE);
      register_guard_page(base_ + mapped_ - page, "a kernel accessed dynamic shared memory past the launch's size");
    }
    // Ends at the guard page, keeping 16-byte alignment.
    begin_ = base_ + mapped_ - page - (bytes + 15) / 16 * 16;
#endif
    bytes_ = bytes;
    return begin_;
  }

  // Every block starts with bytes no kernel wrote: NaN in every float type.
  void poison() { std::memset(begin_, 0xff, bytes_); }

 private:
  void release() {
#ifdef CUDA_EMULATOR_ASAN
    if (base_) {
      ASAN_UNPOISON_MEMORY_REGION(base_, std::max<size_t>(16, (bytes_ + 15) / 16 * 16));
      std::free(base_);
    }
#else
    if (base_) {
      unregister_guard_page(base_ + mapped_ - static_cast<size_t>(sysconf(_SC_PAGESIZE)));
      munmap(base_, mapped_);
    }
    mapped_ = 0;
#endif
    base_ = nullptr;
  }

  unsigned char* base_ = nullptr;
  unsigned char* begin_ = nullptr;
  size_t bytes_ = 0;
  size_t mapped_ = 0;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::shfl_idx: return "__shfl_sync";
    case WarpOp::shfl_up: return "__shfl_up_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
    case WarpOp::ballot: return "__ballot_sync";
    case WarpOp::any: return "__any_sync";
    case WarpOp::all: return "__all_sync";
    case WarpOp::syncwarp: return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned value) {
  std::ostringstream s;
  s << std::hex << value;
  return s.str();
}

std::string describe(const uint3& i) {
  std::ostringstream s;
  s << "(" << i.x << ", " << i.y << ", " << i.z << ")";
  return s.str();
}

// The block an OS thread is running, and its fibers (kept across blocks and
// launches: a fiber's stack is mapped once).
struct BlockRunner {
  std::vector<std::unique_ptr<Thread>> threads;
  int count = 0;     // threads of the current block
  int current = -1;  // the running one
  KernelCall call = nullptr;
  void* arguments = nullptr;
  std::string failure;  // set by a thread that must not go on
  SharedMemory shared;

  Thread& running() { return *threads[current]; }

  static void thread_main(void* self) {
    auto* runner = static_cast<BlockRunner*>(self);
    runner->call(runner->arguments);
    runner->running().state = State::exited;
    for (;;) runner->running().fiber.suspend();
  }

  void park(State state) {
    running().state = state;
    running().fiber.suspend();
  }

  // Runs block `index`; returns false (and sets `failure`) on a kernel error.
  bool run(const uint3& index, const dim3& block) {
    count = static_cast<int>(block.x * block.y * block.z);
    while (static_cast<int>(threads.size()) < count) threads.push_back(std::make_unique<Thread>());
    for (int t = 0; t < count; ++t) {
      Thread& th = *threads[t];
      th.state = State::runnable;
      th.index = {static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                  static_cast<unsigned>(t / (block.x * block.y))};
      th.lane = t % kWarpSize;
      th.fiber.start(&BlockRunner::thread_main, this);
    }
    block_idx = index;
    failure.clear();
    const bool descending = g_schedule.load() == Schedule::descending;
    for (;;) {
      bool ran = false;
      for (int k = 0; k < count; ++k) {
        current = descending ? count - 1 - k : k;
        Thread& th = *threads[current];
        if (th.state != State::runnable) continue;
        thread_idx = th.index;
        th.fiber.resume();
        ran = true;
        if (!failure.empty()) return false;
      }
      current = -1;
      if (ran) continue;
      int exited = 0, at_barrier = 0, at_warp = 0;
      for (int t = 0; t < count; ++t) {
        exited += threads[t]->state == State::exited;
        at_barrier += threads[t]->state == State::at_barrier;
        at_warp += threads[t]->state == State::at_warp_op;
      }
      if (exited == count) return true;
      if (at_warp > 0) {
        if (!complete_warp_collectives()) return false;
        continue;
      }
      // Every thread left is at a barrier.
      if (exited > 0) {
        std::ostringstream s;
        s << "block " << describe(block_idx) << ": __syncthreads reached by " << at_barrier << " of "
          << count << " threads; thread " << describe(first_in(State::exited))
          << " had returned (a divergent barrier)";
        failure = s.str();
        return false;
      }
      for (int t = 0; t < count; ++t) threads[t]->state = State::runnable;
    }
  }

  uint3 first_in(State state) const {
    for (int t = 0; t < count; ++t) {
      if (threads[t]->state == state) return threads[t]->index;
    }
    return {};
  }

  // Completes every warp collective whose lanes have all arrived; false (with
  // `failure`) when one never can.
  bool complete_warp_collectives() {
    bool completed = false;
    std::string stuck;
    for (int first = 0; first < count; first += kWarpSize) {
      const int lanes = std::min(kWarpSize, count - first);
      for (int l = 0; l < lanes; ++l) {
        Thread& th = *threads[first + l];
        if (th.state != State::at_warp_op) continue;
        std::string why = check_group(first, lanes, th);
        if (!why.empty()) {
          if (stuck.empty()) stuck = why;
          continue;
        }
        complete_group(first, th);
        if (!failure.empty()) return false;
        completed = true;
      }
    }
    if (completed) return true;
    failure = stuck;
    return false;
  }

  // "block ..., thread ...: <collective> with mask 0x...", the opening of a
  // report about `th`'s collective (built only when there is one to make).
  std::string at_collective(const Thread& th) const {
    return "block " + describe(block_idx) + ", thread " + describe(th.index) + ": " + op_name(th.op) +
        " with mask 0x" + hex(th.mask);
  }

  // Why lane `th`'s collective cannot complete (empty: it can).
  std::string check_group(int first, int lanes, const Thread& th) const {
    if (!(th.mask >> th.lane & 1u)) {
      return at_collective(th) + ": the calling lane " + std::to_string(th.lane) + " is not in the mask";
    }
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(th.mask >> l & 1u)) continue;
      const std::string lane = ": lane " + std::to_string(l);
      if (l >= lanes) {
        return at_collective(th) + lane + " does not exist (the block has " + std::to_string(count) + " threads)";
      }
      const Thread& other = *threads[first + l];
      if (other.state == State::exited) return at_collective(th) + lane + " has returned";
      if (other.state == State::at_barrier) return at_collective(th) + lane + " waits at __syncthreads";
      if (other.op != th.op || other.mask != th.mask || other.size != th.size || other.width != th.width) {
        return at_collective(th) + lane + " is at another warp collective (" + op_name(other.op) +
            ", mask 0x" + hex(other.mask) + ")";
      }
    }
    if (th.width < 1 || th.width > kWarpSize || (th.width & (th.width - 1)) != 0) {
      return at_collective(th) + ": width " + std::to_string(th.width) + " is not a power of two in [1, 32]";
    }
    return {};
  }

  // The lane a shuffle reads, by the PTX shfl rules (a source outside the
  // lane's `width` segment reads the lane's own value).
  static int source_lane(const Thread& th) {
    const int lane = th.lane;
    const int segment_mask = kWarpSize - th.width;  // shfl's c[12:8]
    const int clamp = th.op == WarpOp::shfl_up ? 0 : kWarpSize - 1;
    const int max_lane = (lane & segment_mask) | (clamp & ~segment_mask);
    const int min_lane = lane & segment_mask;
    int j = lane;
    bool in_range = false;
    switch (th.op) {
      case WarpOp::shfl_up: j = lane - th.lane_arg; in_range = j >= max_lane; break;
      case WarpOp::shfl_down: j = lane + th.lane_arg; in_range = j <= max_lane; break;
      case WarpOp::shfl_xor: j = lane ^ (th.lane_arg & 31); in_range = j <= max_lane; break;
      case WarpOp::shfl_idx: j = min_lane | (th.lane_arg & 31 & ~segment_mask); in_range = j <= max_lane; break;
      default: break;
    }
    return in_range ? j : lane;
  }

  void complete_group(int first, const Thread& leader) {
    const unsigned mask = leader.mask;
    const WarpOp op = leader.op;
    unsigned ballot = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      if (mask >> l & 1u && threads[first + l]->predicate) ballot |= 1u << l;
    }
    std::array<int, kWarpSize> sources;
    sources.fill(-1);
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      Thread& th = *threads[first + l];
      if (op == WarpOp::shfl_idx || op == WarpOp::shfl_up || op == WarpOp::shfl_down || op == WarpOp::shfl_xor) {
        const int src = source_lane(th);
        if (!(mask >> src & 1u)) {
          failure = "block " + describe(block_idx) + ", thread " + describe(th.index) + ": " + op_name(op) +
              " reads lane " + std::to_string(src) + ", which is not in the mask 0x" + hex(mask);
        }
        sources[l] = src;
      }
    }
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      Thread& th = *threads[first + l];
      if (sources[l] >= 0) std::memcpy(th.result, threads[first + sources[l]]->value, th.size);
      if (th.vote) {
        *th.vote = op == WarpOp::ballot ? ballot
            : op == WarpOp::any         ? static_cast<unsigned>(ballot != 0)
                                        : static_cast<unsigned>(ballot == mask);
      }
      th.state = State::runnable;
    }
  }
};

thread_local BlockRunner t_runner;

} // namespace

void register_guard_page(const void* page, const char* what) {
  install_fault_handler();
  for (int i = 0; i < kMaxGuardPages; ++i) {
    uintptr_t expected = 0;
    if (g_guard_pages[i].compare_exchange_strong(expected, reinterpret_cast<uintptr_t>(page))) {
      g_guard_meaning[i].store(what);
      return;
    }
  }
}

void unregister_guard_page(const void* page) {
  for (int i = 0; i < kMaxGuardPages; ++i) {
    uintptr_t expected = reinterpret_cast<uintptr_t>(page);
    if (g_guard_pages[i].compare_exchange_strong(expected, 0)) return;
  }
}

void sync_threads() {
  BlockRunner& r = t_runner;
  if (r.current < 0) return;  // host code: nothing to wait for
  r.park(State::at_barrier);
}

void warp_collective(
    WarpOp op, unsigned mask, const void* value, int size, int lane_arg, int width, int predicate,
    void* result, unsigned* vote) {
  BlockRunner& r = t_runner;
  Thread& th = r.running();
  th.op = op;
  th.mask = mask;
  th.size = size;
  th.lane_arg = lane_arg;
  th.width = width;
  th.predicate = predicate != 0;
  if (size > 0) std::memcpy(th.value, value, size);
  th.result = result;
  th.vote = vote;
  r.park(State::at_warp_op);
}

// Returns the launch's error as launch.cuh's helper does on a GPU (<<<>>>
// then cudaGetLastError()), so no error is left pending.
cudaError_t run_grid(
    const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, KernelCall call,
    void* arguments) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  if (threads == 0 || blocks == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    const auto limit = g_max_dynamic_shared.find(kernel);
    const int64_t allowed = limit == g_max_dynamic_shared.end() ? kDefaultDynamicSharedBytes : limit->second;
    if (static_cast<int64_t>(shared_bytes) > allowed) return cudaErrorInvalidValue;
    g_launch_counts[kernel] += 1;
  }
  std::atomic<bool> failed{false};
  std::string failure;
  const int workers = static_cast<int>(std::min<int64_t>(blocks, omp_get_max_threads()));
#pragma omp parallel num_threads(workers)
  {
    BlockRunner& runner = t_runner;
    runner.call = call;
    runner.arguments = arguments;
    block_dim = block;
    grid_dim = grid;
    dynamic_shared = runner.shared.reset(shared_bytes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      if (failed.load(std::memory_order_relaxed)) continue;
      const uint3 index{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                        static_cast<unsigned>(b / (int64_t{grid.x} * grid.y))};
      runner.shared.poison();
      if (!runner.run(index, block)) {
        std::lock_guard<std::mutex> lock(g_mutex);
        if (!failed.exchange(true)) failure = runner.failure;
      }
    }
    dynamic_shared = nullptr;
  }
  if (failed) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_last_failure = failure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

} // namespace detail

void set_schedule(Schedule schedule) { detail::g_schedule.store(schedule); }
Schedule schedule() { return detail::g_schedule.load(); }

std::string last_failure() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  return detail::g_last_failure;
}

std::vector<std::pair<const void*, int64_t>> launch_counts() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  return {detail::g_launch_counts.begin(), detail::g_launch_counts.end()};
}

} // namespace cuda_emulator

// The runtime API calls the launchers make.
extern "C" {

// Every launch returns its own error (run_grid), so none is ever pending.
cudaError_t cudaGetLastError(void) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = cuda_emulator::detail::kOptinSharedBytes; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = cuda_emulator::detail::kDefaultDynamicSharedBytes; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > cuda_emulator::detail::kOptinSharedBytes) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(cuda_emulator::detail::g_mutex);
  cuda_emulator::detail::g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}

} // extern "C"
