// Reading the private memory of another process on this node (Linux cross-memory attach,
// process_vm_readv): the kernel copies straight from a peer's buffer into ours, one copy and no
// shared segment in between. Whether it is allowed depends on the kernel, the Yama LSM, seccomp
// and the container, so callers probe it before relying on it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pycomm {

// Lets any process of this user read this one's memory where the Yama LSM would otherwise allow
// only its ancestors (prctl PR_SET_PTRACER); a no-op where Yama is absent.
void AllowPeerReads();

// True if `bytes` at `remote` in process `pid` can be read into `local` (copied there). Never
// throws: for probing. False also when PYCOMM_CMA=0 disables peer reads in this process.
bool TryReadPeer(int64_t pid, const void* remote, void* local, size_t bytes);

// Copies `bytes` at `remote` in process `pid` (rank `peer`) into `local`. PeerError naming the
// rank when its process is gone; CommError on any other failure.
void ReadPeer(int64_t pid, int peer, const void* remote, void* local, size_t bytes);

}  // namespace pycomm
