#include "transport/wait.h"

#include <sched.h>
#include <sys/prctl.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "pycomm/pycomm.h"

namespace pycomm {

namespace {
// Tuned so a message from a running peer is seen within a microsecond or two, while a rank that
// waits on a descheduled peer gives its core away after a few microseconds.
constexpr unsigned kSpinPolls = 64;
constexpr unsigned kYieldPolls = kSpinPolls + 256;
constexpr auto kMaxSleep = std::chrono::microseconds(200);
// Timeouts beyond this (about 30 years, or infinity) mean "no deadline": converting them to clock
// ticks would overflow.
constexpr double kNoDeadline = 1e9;

// Linux stretches every sleep by the thread's timer slack (50 us by default): far longer than
// the microseconds a peer usually needs. Tightened for our sleeps only; the caller's thread gets
// its own slack back.
void SleepFor(std::chrono::microseconds duration) {
  const int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // nanoseconds
  std::this_thread::sleep_for(duration);
  if (slack > 0) prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(slack), 0, 0, 0);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace

void Backoff::Pause() {
  ++polls_;
  if (polls_ < kSpinPolls) {
    CpuRelax();
  } else if (polls_ < kYieldPolls) {
    sched_yield();
  } else {
    // Grows from 1 us to kMaxSleep so that a long wait costs next to no CPU.
    auto sleep = std::chrono::microseconds(1u << std::min(8u, (polls_ - kYieldPolls) / 16));
    SleepFor(std::min<std::chrono::microseconds>(sleep, kMaxSleep));
  }
}

void Wait(Request& request, double timeout_s) {
  using Clock = std::chrono::steady_clock;
  Backoff backoff;
  unsigned polls = 0;
  Clock::time_point deadline{};
  while (!request.Test()) {
    // Reading the clock costs more than a poll: start it only once the wait is not short, and
    // look at it every few polls.
    if ((++polls & 63) == 0 && timeout_s < kNoDeadline) {
      auto now = Clock::now();
      if (deadline == Clock::time_point{}) {
        deadline = now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
      } else if (now >= deadline) {
        const int peer = request.peer();
        throw PeerError("pycomm: timed out after " + std::to_string(timeout_s) + " s waiting for " +
                            (peer >= 0 ? "rank " + std::to_string(peer) : std::string("a collective of MPI's")) +
                            " (PYCOMM_TIMEOUT)",
                        peer);
      }
    }
    backoff.Pause();
  }
}

void WaitAll(std::vector<std::unique_ptr<Request>>& requests, double timeout_s) {
  for (auto& request : requests) {
    if (request) Wait(*request, timeout_s);
  }
  requests.clear();
}

}  // namespace pycomm
