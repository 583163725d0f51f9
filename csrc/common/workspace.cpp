#include "workspace.h"

#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastconv {
namespace {

struct Buffer {
  void* ptr = nullptr;
  int64_t bytes = 0;       // allocated
  int64_t high_water = 0;  // largest request since the last release
  ~Buffer() { std::free(ptr); }
};

// thread_local: concurrent calls from several Python threads each get their own scratch.
thread_local Buffer tls_buffers[kWsSlots];

}  // namespace

void* workspace(WorkspaceSlot slot, int64_t bytes) {
  Buffer& b = tls_buffers[slot];
  if (bytes > b.high_water) b.high_water = bytes;
#if defined(__SANITIZE_ADDRESS__)
  // Sanitized builds allocate exactly the bytes asked for, on every call, so AddressSanitizer
  // sees any access past them (the rounding below would hide small overruns). Kernels use
  // unaligned loads, so malloc's alignment is enough.
  std::free(b.ptr);
  b.ptr = std::malloc(static_cast<size_t>(bytes > 0 ? bytes : 1));
#else
  if (bytes <= b.bytes) return b.ptr;
  std::free(b.ptr);
  // Round up so that slowly growing shapes do not reallocate on every call.
  b.bytes = ((bytes + bytes / 4 + 4095) / 4096) * 4096;
  b.ptr = std::aligned_alloc(64, static_cast<size_t>(b.bytes));
#endif
  if (!b.ptr) {
    b.bytes = 0;
    throw std::bad_alloc();
  }
  return b.ptr;
}

void release_workspaces() {
  for (Buffer& b : tls_buffers) {
    std::free(b.ptr);
    b.ptr = nullptr;
    b.bytes = 0;
    b.high_water = 0;
  }
}

void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), begin = (a + kHuge - 1) / kHuge * kHuge,
                  end = (a + uintptr_t(bytes)) / kHuge * kHuge;
  // Only whole 2 MiB pages inside [p, p + bytes): no other allocation shares them. Advice
  // only: a failure (no THP here) leaves 4 KiB pages.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

int64_t workspace_high_water_bytes(WorkspaceSlot slot) { return tls_buffers[slot].high_water; }

const char* workspace_slot_name(WorkspaceSlot slot) {
  static const char* const names[kWsSlots] = {
      "activation_nhwc", "grad_output_nhwc", "output_nhwc",    "staging",
      "packed_weights",  "weights_tap_major", "columns",       "accumulators",
      "grad_bias_sums",  "tap_tables",        "gemm_whole_operand", "gemm_panels_a",
      "gemm_panels_b",   "winograd_input",    "winograd_output", "multiplier_slice",
      "multiplier_sum"};
  return names[slot];
}

}  // namespace fastconv
