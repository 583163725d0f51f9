// Time per phase of the last call of a kernel that runs in phases (Winograd: filter
// transform, input transform, GEMM, output transform), for benchmarks that print the split.
// Compiled once (not per ISA).
#pragma once
#include <chrono>

namespace fastconv {

struct PhaseTimes {
  // Seconds summed over the threads that ran each phase.
  double filter_transform = 0, input_transform = 0, gemm = 0, output_transform = 0;
  double wall = 0;  // of the whole call
  int threads = 0;
};

// The last call's times (per calling thread, like the workspaces).
PhaseTimes& last_phase_times();

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace fastconv
