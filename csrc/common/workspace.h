// Per-calling-thread scratch memory that grows and is kept, so steady-state calls neither
// allocate nor page-fault (a fresh 4 KiB page costs ~1 us here). Each slot is one buffer;
// buffers of different slots are live at the same time. Never called from inside a parallel
// region. Compiled once (not per ISA).
#pragma once
#include <cstdint>
#include <vector>

namespace fastconv {

enum WorkspaceSlot : int {
  kWsActivationNhwc,    // an activation (input, or grad_y for grad-input) copied to NHWC
  kWsGradOutputNhwc,    // grad_y copied to NHWC for grad-weight
  kWsOutputNhwc,        // an NHWC result before it is transposed into an NCHW output
  kWsStaging,           // a short-lived copy consumed before the next slot is filled
  kWsPackedWeights,     // weights in a kernel's packed layout (direct's [tap][c][block])
  kWsWeightsTapMajor,   // weights permuted to [k][tap][c], or grad-weight in that order
  kWsColumns,           // an im2col column matrix chunk
  kWsAccumulators,      // partial sums: direct grad-weight tiles, grad-bias per thread
  kWsGradBiasSums,      // grad-bias summed inside a grad-weight sweep (float64)
  kWsTapTables,         // direct's per-tap offset tables and its row of zeros
  kWsGemmWholeOperand,  // one GEMM operand packed whole, reused across GEMM calls
  kWsGemmPanelsA,       // the GEMM's packed A block (MC x KC)
  kWsGemmPanelsB,       // the GEMM's packed B block (KC x NC)
  kWsWinogradInput,     // Winograd: per-thread transformed input of one tile block (B panels)
  kWsWinogradOutput,    // Winograd: per-thread transform-domain products before the output transform
  kWsMultiplierSlice,   // depthwise, multiplier m: grad_y's and w's channels j, j + m, ... dense
  kWsMultiplierSum,     // depthwise, multiplier m: one slice's grad-input, before it is added
  kWsSlots
};

void* workspace(WorkspaceSlot slot, int64_t bytes);
void release_workspaces();

// Asks the kernel (Linux, transparent huge pages in `madvise` mode) to back the whole 2 MiB
// pages inside [p, p + bytes) with huge pages when they are first touched: a fresh output's
// first-touch faults are ~1 us per 4 KiB page here, a tenth of that per 2 MiB page. For large
// buffers not yet written (fresh outputs).
void advise_huge_pages(void* p, int64_t bytes);

// The largest size asked of a slot since the last release, and its name (for tests, which
// compare the sum with the algorithms' estimates and check which paths a call took).
int64_t workspace_high_water_bytes(WorkspaceSlot slot);
const char* workspace_slot_name(WorkspaceSlot slot);

template <typename T>
T* workspace_as(WorkspaceSlot slot, int64_t count) {
  return static_cast<T*>(workspace(slot, count * int64_t(sizeof(T))));
}

// At least `count` values private to the calling thread, OpenMP workers included, and kept
// between calls: small scratch inside parallel regions (too large for a worker's stack). One
// buffer per type and thread: a caller must be done with it before calling anything that
// may use it too.
template <typename T>
T* thread_scratch(int64_t count) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < count) buf.resize(count);
  return buf.data();
}

}  // namespace fastconv
