// Fault injection for tests: PYCOMM_FAULT makes one rank die or stall at one call, so that every
// error path (dead peer, stuck peer) can be tested on purpose.
//
//   PYCOMM_FAULT="rank=1,call=3,action=kill"           rank 1 SIGKILLs itself as it issues call #3
//   PYCOMM_FAULT="rank=1,call=3,action=exit"           ... exits at once (status 3, no cleanup)
//   PYCOMM_FAULT="rank=1,call=3,action=stall,seconds=5" ... stops for 5 s, then goes on
//
// Calls are numbered per communicator in issue order from 1 (the numbers MismatchError and the
// PYCOMM_DEBUG lines show). Unset or empty: no fault.
#pragma once

#include <cstdint>

namespace pycomm {

struct FaultPlan {
  enum Action { kNone, kKill, kExit, kStall };
  Action action = kNone;
  int rank = -1;
  uint64_t call = 0;
  double seconds = 3600;

  // Parses PYCOMM_FAULT; throws std::invalid_argument on a malformed value.
  static FaultPlan FromEnvironment();
  // Carries out the plan if it is for this rank and call.
  void At(int rank, uint64_t call) const;
};

}  // namespace pycomm
