#include "transport/peer_watch.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pycomm/pycomm.h"

namespace pycomm {

// Plain read() and strtoll, not iostreams: an istringstream's number parsing crashed inside
// libstdc++ with the lent H200 machine's toolchain (bench/results/2026-11-27-h200-gpu-recheck.md).
int64_t LiveStartTicks(int64_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char stat[4096];  // field 22 comes well inside it: the command name is at most 64 bytes
  ssize_t got;
  do {
    got = read(fd, stat, sizeof(stat) - 1);
  } while (got < 0 && errno == EINTR);
  close(fd);
  if (got <= 0) return -1;
  stat[got] = '\0';
  // The fields after the command name, which may itself hold spaces and parentheses.
  char* rest = std::strrchr(stat, ')');
  if (!rest || rest[1] != ' ' || !rest[2] || std::strchr("ZXx", rest[2])) return -1;  // field 3: state
  char* field = rest + 3;
  int64_t value = -1;
  for (int i = 4; i <= 22; ++i) {  // field 22: starttime
    char* end = nullptr;
    value = std::strtoll(field, &end, 10);
    if (end == field) return -1;
    field = end;
  }
  return value;
}

ProcessIdentity ThisProcess(int64_t node) {
  const int64_t pid = getpid();
  return ProcessIdentity{pid, LiveStartTicks(pid), node};
}

PeerWatch::PeerWatch(int rank, const std::vector<ProcessIdentity>& ranks, const std::vector<int>& names) {
  for (int q = 0; q < static_cast<int>(ranks.size()); ++q) {
    const ProcessIdentity& peer = ranks[q];
    if (q == rank || peer.start_ticks < 0) continue;
    if (LiveStartTicks(peer.pid) != peer.start_ticks) continue;  // not visible from here
    watched_.push_back(peer);
    watched_ranks_.push_back(names.empty() ? q : names[q]);
  }
}

void PeerWatch::Check(bool now) const {
  if (watched_.empty()) return;
  const auto time = std::chrono::steady_clock::now();
  if (time < next_ && !now) return;
  next_ = time + kInterval;
  std::string dead;
  int first = -1;
  for (size_t i = 0; i < watched_.size(); ++i) {
    if (LiveStartTicks(watched_[i].pid) == watched_[i].start_ticks) continue;
    if (first < 0) first = watched_ranks_[i];
    dead += (dead.empty() ? "" : ", ") + std::string("rank ") + std::to_string(watched_ranks_[i]) + " (pid " +
            std::to_string(watched_[i].pid) + ")";
  }
  if (first < 0) return;
  // All of them: a survivor that gave up on a dead rank may itself be gone by the time others look.
  throw PeerError("pycomm: " + dead + (dead.find(',') == std::string::npos ? " has" : " have") + " died", first);
}

}  // namespace pycomm
