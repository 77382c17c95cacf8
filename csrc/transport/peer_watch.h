// Noticing that a peer on this machine has died, so that a wait fails within a fraction of a second
// with PeerError naming the dead rank instead of running into PYCOMM_TIMEOUT. A process is
// identified by its pid and its start time (a reused pid names another process).
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

namespace pycomm {

struct ProcessIdentity {
  int64_t pid;
  int64_t start_ticks;  // /proc/<pid>/stat's starttime
  int64_t node;         // equal for the ranks of one node (any id the transport chooses)
};

// /proc/<pid>/stat's start time of a live process; -1 where there is no such process, or it has
// exited (a zombie or dead one).
int64_t LiveStartTicks(int64_t pid);

// This process, on `node`.
ProcessIdentity ThisProcess(int64_t node);

class PeerWatch {
 public:
  // `ranks[q]` is rank q's identity. Ranks whose process this one cannot see (on another
  // machine, or in another pid namespace) are not watched. Simulated nodes of one machine
  // (PYCOMM_NODE_ID) are watched like real ranks of one node.
  // `names[q]` is how errors name rank q (its rank in the whole communicator, for a transport over
  // a subgroup); empty: q itself.
  PeerWatch(int rank, const std::vector<ProcessIdentity>& ranks, const std::vector<int>& names = {});

  // Throws PeerError naming the lowest rank known to have died, if any. Looks at /proc at most
  // every kInterval however often it is called, so waiting loops may call it freely; `now`:
  // looks at once (a peer has left, perhaps because another one died: name the dead one).
  void Check(bool now = false) const;

  static constexpr std::chrono::milliseconds kInterval{100};
  // Requests ask the watch once every (kPollMask + 1) failed polls: the clock stays out of the
  // fast spin.
  static constexpr unsigned kPollMask = 255;

 private:
  std::vector<ProcessIdentity> watched_;
  std::vector<int> watched_ranks_;
  mutable std::chrono::steady_clock::time_point next_{};
};

}  // namespace pycomm
