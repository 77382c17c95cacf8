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
// Yielding hands the core to a peer that shares it, and costs a running peer nothing; sleeping
// costs the wake-up latency on every call. Measured with 4 ranks on 2 cores (8-byte allreduce):
// 256 yields before sleeping: 16-45 us; 2000: 4 us (MPICH: 10 us). About a millisecond.
constexpr unsigned kYieldPolls = kSpinPolls + 2048;
constexpr auto kMaxSleep = std::chrono::microseconds(200);
// Timeouts beyond this (about 30 years, or infinity) mean "no deadline": converting them to clock
// ticks would overflow.
constexpr double kNoDeadline = 1e9;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace

std::exception_ptr BlameDeadPeer(const std::exception_ptr& error, Transport& transport) {
  constexpr int kLooks = 3;
  constexpr auto kBetweenLooks = std::chrono::milliseconds(100);
  try {
    std::rethrow_exception(error);
  } catch (const PeerError&) {
    return error;
  } catch (const MismatchError&) {
    return error;
  } catch (const CommError& failure) {
    for (int look = 0; look < kLooks; ++look) {
      if (look > 0) std::this_thread::sleep_for(kBetweenLooks);
      try {
        transport.CheckPeersAlive();
      } catch (const PeerError& dead) {
        return std::make_exception_ptr(
            PeerError(std::string(dead.what()) + " (here it showed as: " + failure.what() + ")", dead.peer()));
      } catch (...) {
        return error;
      }
    }
  } catch (...) {
  }
  return error;
}

TightTimerSlack::TightTimerSlack() : saved_(prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) {
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // nanoseconds
}

TightTimerSlack::~TightTimerSlack() {
  if (saved_ > 0) prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(saved_), 0, 0, 0);
}

void Request::Sleep(std::chrono::microseconds limit) {
  TightTimerSlack slack;
  std::this_thread::sleep_for(limit);
}

void Backoff::Pause(Request* request) {
  ++polls_;
  if (polls_ < kSpinPolls) {
    CpuRelax();
  } else if (polls_ < kYieldPolls) {
    sched_yield();
  } else {
    // Grows from 1 us to kMaxSleep so that a long wait costs next to no CPU.
    auto sleep = std::min<std::chrono::microseconds>(
        std::chrono::microseconds(1u << std::min(8u, (polls_ - kYieldPolls) / 16)), kMaxSleep);
    if (request) {
      request->Sleep(sleep);
    } else {
      TightTimerSlack slack;
      std::this_thread::sleep_for(sleep);
    }
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
    backoff.Pause(&request);
  }
}

void WaitAll(std::vector<std::unique_ptr<Request>>& requests, double timeout_s) {
  for (auto& request : requests) {
    if (request) Wait(*request, timeout_s);
  }
  requests.clear();
}

}  // namespace pycomm
