#include "core/fault.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>

namespace pycomm {

FaultPlan FaultPlan::FromEnvironment() {
  FaultPlan plan;
  const char* env = std::getenv("PYCOMM_FAULT");
  if (!env || !*env) return plan;
  const std::string items = env;
  try {
    // Comma-separated items; a last comma ends the list.
    for (size_t start = 0, end; start < items.size(); start = end + 1) {
      end = std::min(items.find(',', start), items.size());
      const std::string item = items.substr(start, end - start);
      const auto eq = item.find('=');
      const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (key == "rank") {
        plan.rank = std::stoi(value);
      } else if (key == "call") {
        plan.call = std::stoull(value);
      } else if (key == "seconds") {
        plan.seconds = std::stod(value);
      } else if (key == "action") {
        plan.action = value == "kill" ? kKill : value == "exit" ? kExit : value == "stall" ? kStall : kNone;
        if (plan.action == kNone) throw std::invalid_argument(value);
      } else {
        throw std::invalid_argument(key);
      }
    }
  } catch (const std::exception&) {
    throw std::invalid_argument(std::string("pycomm: cannot parse PYCOMM_FAULT=\"") + env +
                                "\" (expected rank=R,call=N,action=kill|exit|stall[,seconds=S])");
  }
  if (plan.action == kNone || plan.rank < 0 || plan.call == 0) {
    throw std::invalid_argument(std::string("pycomm: PYCOMM_FAULT=\"") + env + "\" needs rank, call and action");
  }
  return plan;
}

void FaultPlan::At(int rank_now, uint64_t call_now) const {
  if (action == kNone || rank_now != rank || call_now != call) return;
  std::fprintf(stderr, "pycomm: PYCOMM_FAULT: rank %d at call #%llu: %s\n", rank, static_cast<unsigned long long>(call),
               action == kKill   ? "kill"
               : action == kExit ? "exit"
                                 : "stall");
  std::fflush(stderr);
  switch (action) {
    case kKill:
      kill(getpid(), SIGKILL);
      break;
    case kExit:
      _exit(3);
    case kStall:
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
      break;
    case kNone:
      break;
  }
}

}  // namespace pycomm
