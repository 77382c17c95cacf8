// The checks of the C++ tiers: each program counts passed and failed checks and prints the failed
// ones. Ranks are threads, and each checks its own results, so the counts are atomic.
#pragma once

#include <atomic>
#include <cstdio>
#include <string>

namespace pycomm_test {

inline std::atomic<int> g_passed{0}, g_failed{0};

inline void Expect(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Prints "N passed, N failed"; main's exit status.
inline int Report() {
  std::printf("%d passed, %d failed\n", g_passed.load(), g_failed.load());
  return g_failed ? 1 : 0;
}

}  // namespace pycomm_test
