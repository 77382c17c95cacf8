// Where the host time of a call goes, phase by phase, summed over the process's calls: for the
// latency breakdown of benchmarks (bench/gpu_allreduce.py). Off unless SetPhaseTiming(true)
// asked for it; while off, a lap costs one branch.
#pragma once

#include <chrono>
#include <cstdint>

namespace pycomm {

// One call's laps, added to the process's sums when it goes (so that threads, and ranks that are
// threads in the tests, do not contend per lap).
class PhaseClock {
 public:
  PhaseClock();
  ~PhaseClock();
  PhaseClock(const PhaseClock&) = delete;
  PhaseClock& operator=(const PhaseClock&) = delete;

  // The time since the last lap (or since this clock began) went to `phase`, a string literal.
  void Lap(const char* phase);

 private:
  static constexpr int kMaxLaps = 16;
  uint64_t generation_;  // of the timing this call began under: its laps count only in that one
  bool on_;
  std::chrono::steady_clock::time_point last_;
  int laps_ = 0;
  const char* phase_[kMaxLaps];
  double seconds_[kMaxLaps];
};

}  // namespace pycomm
