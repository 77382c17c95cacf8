#include "transport/peer_memory.h"

#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "pycomm/pycomm.h"

namespace pycomm {

namespace {

// Reads until done: the kernel may stop short of the whole range. Returns 0 or an errno.
int ReadAll(int64_t pid, const void* remote, void* local, size_t bytes) {
  const char* from = static_cast<const char*>(remote);
  char* to = static_cast<char*>(local);
  while (bytes > 0) {
    iovec mine{to, bytes}, theirs{const_cast<char*>(from), bytes};
    const ssize_t got = process_vm_readv(static_cast<pid_t>(pid), &mine, 1, &theirs, 1, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return got < 0 ? errno : EFAULT;
    from += got;
    to += got;
    bytes -= static_cast<size_t>(got);
  }
  return 0;
}

// A process that is exiting may still exist while its memory is already gone (EFAULT).
bool Exited(int64_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!file || !std::getline(file, stat)) return true;
  const auto close = stat.rfind(')');
  return close == std::string::npos || close + 2 >= stat.size() || std::strchr("ZXx", stat[close + 2]) != nullptr;
}

}  // namespace

void AllowPeerReads() {
#ifdef PR_SET_PTRACER
  prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);  // EINVAL without Yama: nothing to allow
#endif
}

bool TryReadPeer(int64_t pid, const void* remote, void* local, size_t bytes) {
  const char* disabled = std::getenv("PYCOMM_CMA");
  if (disabled && std::string(disabled) == "0") return false;
  return ReadAll(pid, remote, local, bytes) == 0;
}

void ReadPeer(int64_t pid, int peer, const void* remote, void* local, size_t bytes) {
  const int error = ReadAll(pid, remote, local, bytes);
  if (error == 0) return;
  const std::string who = "rank " + std::to_string(peer) + " (pid " + std::to_string(pid) + ")";
  if (error == ESRCH || Exited(pid)) throw PeerError("pycomm: " + who + " has died", peer);
  throw CommError("pycomm: reading the memory of " + who + " failed: " + std::strerror(error));
}

}  // namespace pycomm
