#include "core/phase_times.h"

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "pycomm/pycomm.h"

namespace pycomm {

namespace {

std::atomic<bool> g_on{false};
std::mutex g_mu;
std::vector<PhaseTime> g_sums;  // in the order first entered

}  // namespace

void SetPhaseTiming(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (on) g_sums.clear();
  g_on = on;
}

std::vector<PhaseTime> PhaseTimes() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_sums;
}

PhaseClock::PhaseClock() : on_(g_on.load(std::memory_order_relaxed)) {
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
  std::lock_guard<std::mutex> lock(g_mu);
  for (int i = 0; i < laps_; ++i) {
    PhaseTime* sum = nullptr;
    for (PhaseTime& s : g_sums) {
      if (s.phase == phase_[i]) sum = &s;
    }
    if (!sum) sum = &g_sums.emplace_back(PhaseTime{phase_[i], 0.0, 0});
    sum->seconds += seconds_[i];
    ++sum->laps;
  }
}

}  // namespace pycomm
