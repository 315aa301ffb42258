#include "output_stores.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace layernorm_ext::cpu {
namespace {

std::atomic<OutputStores> output_stores{OutputStores::kAuto};

bool page_resident(const void* address) {
#if defined(__linux__)
  static const auto page_size = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const std::uintptr_t page = reinterpret_cast<std::uintptr_t>(address) & ~(page_size - 1);
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(page), page_size, &resident) != 0) return true;
  return (resident & 1) != 0;
#else
  (void)address;
  return true;
#endif
}

} // namespace

bool stream_output_memory(const void* last) {
  switch (output_stores.load(std::memory_order_relaxed)) {
    case OutputStores::kStreamed:
      return true;
    case OutputStores::kPlain:
      return false;
    case OutputStores::kAuto:
      break;
  }
  return page_resident(last);
}

void set_output_stores(OutputStores stores) {
  output_stores.store(stores, std::memory_order_relaxed);
}

OutputStores parse_output_stores(const std::string& name) {
  if (name == "auto") return OutputStores::kAuto;
  if (name == "streamed") return OutputStores::kStreamed;
  if (name == "plain") return OutputStores::kPlain;
  TORCH_CHECK(false, "output stores: expected \"auto\", \"streamed\" or \"plain\", got \"", name, "\"");
}

} // namespace layernorm_ext::cpu
