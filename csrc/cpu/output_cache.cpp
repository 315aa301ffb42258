// The output cache of output_cache.h: a c10::Allocator whose large blocks go,
// when their tensor dies, to a list of idle blocks instead of back to the OS.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cerrno>
#include <cstdlib>
#include <list>
#include <mutex>
#include <vector>

namespace layernorm_ext::cpu {
namespace {

// Below this, malloc reuses its heap without faulting fresh pages, and the
// ops are short enough that a lock would show.
constexpr size_t kMinCachedBytes = size_t{256} << 10;
constexpr size_t kPageBytes = 4096;
constexpr int64_t kDefaultLimitMiB = 1024;

struct Block {
  void* data;
  size_t bytes;
};

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
    const size_t bytes = (nbytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    Block* block = take(bytes);
    if (block == nullptr) block = new Block{c10::alloc_cpu(bytes), bytes};
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
  // The most recently freed idle block that fits `bytes` without wasting more
  // than an eighth of itself, or null.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
      Block* block = *it;
      if (block->bytes >= bytes && block->bytes - bytes <= block->bytes / 8) {
        idle_.erase(std::next(it).base());
        cached_bytes_ -= static_cast<int64_t>(block->bytes);
        ++hits_;
        return block;
      }
    }
    ++misses_;
    return nullptr;
  }

  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
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

  // Oldest first; the caller frees them after releasing the lock (munmap of a
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
      c10::free_cpu(block->data);
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
