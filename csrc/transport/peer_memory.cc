#include "transport/peer_memory.h"

#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pycomm/pycomm.h"
#include "transport/peer_watch.h"

namespace pycomm {

namespace {

// Copies until done: the kernel may stop short of the whole range. Returns 0 or an errno.
int CopyAll(int64_t pid, bool write, void* remote, void* local, size_t bytes) {
  char* theirs = static_cast<char*>(remote);
  char* mine = static_cast<char*>(local);
  while (bytes > 0) {
    iovec here{mine, bytes}, there{theirs, bytes};
    const pid_t p = static_cast<pid_t>(pid);
    const ssize_t done =
        write ? process_vm_writev(p, &here, 1, &there, 1, 0) : process_vm_readv(p, &here, 1, &there, 1, 0);
    if (done < 0 && errno == EINTR) continue;
    if (done <= 0) return done < 0 ? errno : EFAULT;
    theirs += done;
    mine += done;
    bytes -= static_cast<size_t>(done);
  }
  return 0;
}

void Check(int error, int64_t pid, int peer, const char* what) {
  if (error == 0) return;
  const std::string who = "rank " + std::to_string(peer) + " (pid " + std::to_string(pid) + ")";
  // A process that is exiting may still exist while its memory is already gone (EFAULT).
  if (error == ESRCH || LiveStartTicks(pid) < 0) throw PeerError("pycomm: " + who + " has died", peer);
  throw CommError(std::string("pycomm: ") + what + " the memory of " + who + " failed: " + std::strerror(error));
}

}  // namespace

void AllowPeerAccess() {
#ifdef PR_SET_PTRACER
  prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);  // EINVAL without Yama: nothing to allow
#endif
}

bool TryPeerAccess(int64_t pid, void* remote, void* local, size_t bytes) {
  const char* disabled = std::getenv("PYCOMM_CMA");
  if (disabled && std::string(disabled) == "0") return false;
  return CopyAll(pid, false, remote, local, bytes) == 0 && CopyAll(pid, true, remote, local, bytes) == 0;
}

void ReadPeer(int64_t pid, int peer, const void* remote, void* local, size_t bytes) {
  Check(CopyAll(pid, false, const_cast<void*>(remote), local, bytes), pid, peer, "reading");
}

void WritePeer(int64_t pid, int peer, const void* local, void* remote, size_t bytes) {
  Check(CopyAll(pid, true, remote, const_cast<void*>(local), bytes), pid, peer, "writing");
}

}  // namespace pycomm
