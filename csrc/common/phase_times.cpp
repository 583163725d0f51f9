#include "phase_times.h"

namespace fastconv {

PhaseTimes& last_phase_times() {
  thread_local PhaseTimes times;
  return times;
}

}  // namespace fastconv
