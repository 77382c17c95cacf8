#include "transport/peer_watch.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "pycomm/pycomm.h"

namespace pycomm {

namespace {

// The process's start time, or -1 if it no longer exists or has exited (zombie or dead state).
int64_t StartTicks(int64_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!file || !std::getline(file, stat)) return -1;
  // Fields after the command name, which may itself hold spaces and parentheses.
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream fields(stat.substr(close + 1));
  std::string state, field;
  fields >> state;
  if (state == "Z" || state == "X" || state == "x") return -1;
  for (int i = 4; i < 22; ++i) fields >> field;  // fields 4 .. 21
  int64_t start = -1;
  fields >> start;  // field 22: starttime
  return start;
}

}  // namespace

ProcessIdentity ThisProcess(int64_t node) {
  const int64_t pid = getpid();
  return ProcessIdentity{pid, StartTicks(pid), node};
}

PeerWatch::PeerWatch(int rank, const std::vector<ProcessIdentity>& ranks, const std::vector<int>& names) {
  for (int q = 0; q < static_cast<int>(ranks.size()); ++q) {
    const ProcessIdentity& peer = ranks[q];
    if (q == rank || peer.start_ticks < 0) continue;
    if (StartTicks(peer.pid) != peer.start_ticks) continue;  // not visible from here
    watched_.push_back(peer);
    watched_ranks_.push_back(names.empty() ? q : names[q]);
  }
}

void PeerWatch::Check() const {
  if (watched_.empty()) return;
  const auto now = std::chrono::steady_clock::now();
  if (now < next_) return;
  next_ = now + kInterval;
  std::string dead;
  int first = -1;
  for (size_t i = 0; i < watched_.size(); ++i) {
    if (StartTicks(watched_[i].pid) == watched_[i].start_ticks) continue;
    if (first < 0) first = watched_ranks_[i];
    dead += (dead.empty() ? "" : ", ") + std::string("rank ") + std::to_string(watched_ranks_[i]) + " (pid " +
            std::to_string(watched_[i].pid) + ")";
  }
  if (first < 0) return;
  // All of them: a survivor that gave up on a dead rank may itself be gone by the time others look.
  throw PeerError("pycomm: " + dead + (dead.find(',') == std::string::npos ? " has" : " have") + " died", first);
}

}  // namespace pycomm
