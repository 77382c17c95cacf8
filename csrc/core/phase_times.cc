#include "core/phase_times.h"

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "pycomm/pycomm.h"

namespace pycomm {

namespace {

// Odd while timing is on. Turning it on (again) or off moves it on, so that a call that began
// before adds nothing.
std::atomic<uint64_t> g_generation{0};
std::mutex g_mu;
std::vector<PhaseTime> g_sums;  // in the order first entered

}  // namespace

void SetPhaseTiming(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (on) g_sums.clear();
  const uint64_t now = g_generation.load();
  const bool was_on = now % 2 == 1;
  g_generation = now + (on ? (was_on ? 2 : 1) : (was_on ? 1 : 0));  // on: the next odd one
}

std::vector<PhaseTime> PhaseTimes() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_sums;
}

PhaseClock::PhaseClock() : generation_(g_generation.load(std::memory_order_relaxed)), on_(generation_ % 2 == 1) {
  if (on_) last_ = std::chrono::steady_clock::now();
}

void PhaseClock::Lap(const char* phase) {
  if (!on_ || laps_ == kMaxLaps) return;
  const auto now = std::chrono::steady_clock::now();
  phase_[laps_] = phase;
  seconds_[laps_++] = std::chrono::duration<double>(now - last_).count();
  last_ = now;
}

PhaseClock::~PhaseClock() {
  if (!on_ || laps_ == 0) return;
  try {  // a destructor, maybe while a failed call unwinds: a timing lost is no error
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_generation.load() != generation_) return;  // timing stopped, or began again, meanwhile
    for (int i = 0; i < laps_; ++i) {
      PhaseTime* sum = nullptr;
      for (PhaseTime& s : g_sums) {
        if (s.phase == phase_[i]) sum = &s;
      }
      if (!sum) sum = &g_sums.emplace_back(PhaseTime{phase_[i], 0.0, 0});
      sum->seconds += seconds_[i];
      ++sum->laps;
    }
  } catch (...) {
  }
}

}  // namespace pycomm
