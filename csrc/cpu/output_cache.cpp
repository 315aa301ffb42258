// The output cache of output_cache.h: a c10::Allocator whose large blocks go,
// when their tensor dies, to a list of idle blocks instead of back to the OS.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define LAYERNORM_EXT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define LAYERNORM_EXT_ASAN 1
#endif
#endif

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace layernorm_ext::cpu {
namespace {

// Below this, malloc reuses its heap without faulting fresh pages, and the
// ops are short enough that a lock would show.
constexpr size_t kMinCachedBytes = size_t{256} << 10;
// Four 32 MiB outputs: the y and dx of two 8192 x 1024 float32 layers (8
// sequences of 1024 tokens at hidden size 1024), enough for the blocks a
// training loop frees and asks for again from one layer to the next, while
// the memory a process keeps idle for speed stays small next to what its
// tensors take. Models that want every layer's outputs to come back from the
// cache raise it with LAYERNORM_EXT_CPU_CACHE_MB.
constexpr int64_t kDefaultLimitMiB = 128;
// Blocks come in size classes, this many per doubling: a request rounds up
// to its class, so that the sizes of a growing sequence length or batch land
// in blocks freed by the sizes before them, and rounding wastes less than an
// eighth of a block. The smallest class step, kMinCachedBytes / 8, is a
// whole number of pages.
constexpr size_t kClassesPerDoubling = 8;
static_assert((kMinCachedBytes & (kMinCachedBytes - 1)) == 0 &&
                  kMinCachedBytes / kClassesPerDoubling % 4096 == 0,
              "size_class_bytes steps from kMinCachedBytes by doublings, in whole pages");

// nbytes >= kMinCachedBytes.
size_t size_class_bytes(size_t nbytes) {
  // An eighth of the largest power of two <= nbytes.
  size_t step = kMinCachedBytes / kClassesPerDoubling;
  while (step * kClassesPerDoubling * 2 <= nbytes) step *= 2;
  return (nbytes + step - 1) / step * step;
}

// Blocks are mapped from the OS and unmapped back to it, not taken from
// malloc: glibc's free keeps a large block in its heap, resident, once its
// dynamic mmap threshold has grown past the block's size, which would leave
// empty_output_cache() returning nothing to the OS.
void* map_block(size_t bytes) {
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return data == MAP_FAILED ? nullptr : data;
}

struct Block {
  void* data;
  size_t bytes;
};

// Under AddressSanitizer, the bytes of a block that no tensor owns (past the
// `owned` bytes of its tensor, or all of an idle block) are poisoned, so that
// a kernel writing past its output, or a use after free, is caught as it
// would be in malloc'ed memory.
void set_owned_bytes(const Block& block, size_t owned) {
#ifdef LAYERNORM_EXT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(block.data, owned);
  ASAN_POISON_MEMORY_REGION(static_cast<char*>(block.data) + owned, block.bytes - owned);
#else
  (void)block;
  (void)owned;
#endif
}

int64_t limit_from_env() {
  const char* text = std::getenv("LAYERNORM_EXT_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(text, &end, 10);
  if (errno != 0 || *end != '\0' || mib < 0 || mib > (int64_t{1} << 40)) {
    TORCH_WARN(
        "layernorm_ext: LAYERNORM_EXT_CPU_CACHE_MB must be a whole number of MiB >= 0, but is '",
        text, "'; using the default, ", kDefaultLimitMiB);
    return kDefaultLimitMiB << 20;
  }
  return static_cast<int64_t>(mib) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_bytes_(limit_from_env()) {
    // A fork while another thread holds the lock would leave the child's copy
    // locked forever; hold it across fork so both sides start unlocked.
    pthread_atfork(
        [] { instance().mutex_.lock(); },
        [] { instance().mutex_.unlock(); },
        [] { instance().mutex_.unlock(); });
  }

  // Never destroyed: tensors may free their blocks during interpreter shutdown,
  // after static destructors have run.
  static OutputCache& instance() {
    static auto* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    Block* block = take(nbytes);
    if (block == nullptr) {
      const size_t bytes = size_class_bytes(nbytes);
      void* data = map_block(bytes);
      if (data == nullptr) {
        // Idle blocks are there for speed; hand them back before failing.
        empty();
        data = map_block(bytes);
      }
      TORCH_CHECK_WITH(
          OutOfMemoryError, data != nullptr, "layernorm_ext: CPU out of memory: could not map ",
          bytes, " bytes for an output (", std::strerror(errno), ")");
      block = new Block{data, bytes};
    }
    set_owned_bytes(*block, nbytes);
    return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, limit_bytes_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_output_cache_limit: expected a limit >= 0 bytes, but got ", bytes);
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_ = bytes;
      evict_over_limit(evicted);
    }
    free_blocks(evicted);
  }

  int64_t empty() {
    std::vector<Block*> evicted;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.assign(idle_.begin(), idle_.end());
      idle_.clear();
      freed = cached_bytes_;
      cached_bytes_ = 0;
    }
    free_blocks(evicted);
    return freed;
  }

 private:
  // The smallest idle block (of those, the most recently freed) that holds
  // `nbytes` without wasting more than an eighth of itself, or null. A block
  // of the request's own size class always qualifies (see
  // kClassesPerDoubling).
  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      const size_t bytes = (*it)->bytes;
      if (bytes >= nbytes && bytes - nbytes <= bytes / 8 &&
          (best == idle_.end() || bytes <= (*best)->bytes)) {
        best = it;
      }
    }
    if (best == idle_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* block = *best;
    idle_.erase(best);
    cached_bytes_ -= static_cast<int64_t>(block->bytes);
    ++hits_;
    return block;
  }

  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
    set_owned_bytes(*block, 0);
    auto& cache = instance();
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (static_cast<int64_t>(block->bytes) > cache.limit_bytes_) {
        evicted.push_back(block);
      } else {
        cache.idle_.push_back(block);
        cache.cached_bytes_ += static_cast<int64_t>(block->bytes);
        cache.evict_over_limit(evicted);
      }
    }
    free_blocks(evicted);
  }

  // Oldest first; the caller unmaps them after releasing the lock (munmap of a
  // large block takes long enough to stall other threads' allocations).
  void evict_over_limit(std::vector<Block*>& evicted) {
    while (cached_bytes_ > limit_bytes_) {
      Block* oldest = idle_.front();
      idle_.pop_front();
      cached_bytes_ -= static_cast<int64_t>(oldest->bytes);
      evicted.push_back(oldest);
    }
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      // The shadow of unmapped memory must not stay poisoned for what is
      // mapped there next.
      set_owned_bytes(*block, block->bytes);
      munmap(block->data, block->bytes);
      delete block;
    }
  }

  std::mutex mutex_;
  std::list<Block*> idle_;  // in the order they were freed
  int64_t cached_bytes_ = 0;
  int64_t limit_bytes_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

} // namespace

at::Tensor empty_output(
    at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(
      sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
      options.dtype().toScalarType(), format);
}

OutputCacheInfo output_cache_info() {
  return OutputCache::instance().info();
}

void set_output_cache_limit(int64_t bytes) {
  OutputCache::instance().set_limit(bytes);
}

int64_t empty_output_cache() {
  return OutputCache::instance().empty();
}

} // namespace layernorm_ext::cpu
