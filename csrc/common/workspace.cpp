#include <cstdlib>
#include <new>

#include "geometry.h"

namespace fastconv {
namespace {

struct Buffer {
  void* ptr = nullptr;
  int64_t bytes = 0;
  ~Buffer() { std::free(ptr); }
};

// thread_local: concurrent calls from several Python threads each get their own scratch.
thread_local Buffer tls_buffers[kWsSlots];

}  // namespace

void* workspace(int slot, int64_t bytes) {
  Buffer& b = tls_buffers[slot];
  if (bytes <= b.bytes) return b.ptr;
  std::free(b.ptr);
  b.ptr = nullptr;
  b.bytes = 0;
  // Round up so that slowly growing shapes do not reallocate on every call.
  int64_t want = ((bytes + bytes / 4 + 4095) / 4096) * 4096;
  void* p = std::aligned_alloc(64, static_cast<size_t>(want));
  if (!p) throw std::bad_alloc();
  b.ptr = p;
  b.bytes = want;
  return p;
}

void release_workspaces() {
  for (Buffer& b : tls_buffers) {
    std::free(b.ptr);
    b.ptr = nullptr;
    b.bytes = 0;
  }
}

}  // namespace fastconv
