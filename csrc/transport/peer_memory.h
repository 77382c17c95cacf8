// Reading and writing the private memory of another process on this node (Linux cross-memory
// attach, process_vm_readv / process_vm_writev): the kernel copies straight between a peer's
// buffer and ours, one copy and no shared segment in between. Whether it is allowed depends on
// the kernel, the Yama LSM, seccomp and the container, so callers probe it before relying on it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pycomm {

// Lets any process of this user access this one's memory where the Yama LSM would otherwise
// allow only its ancestors (prctl PR_SET_PTRACER); a no-op where Yama is absent.
void AllowPeerAccess();

// True if `bytes` at `remote` in process `pid` could be read into `local`, then `local` written
// back there. Never throws: for probing. False also when PYCOMM_CMA=0 disables peer access in
// this process.
bool TryPeerAccess(int64_t pid, void* remote, void* local, size_t bytes);

// Copies `bytes` at `remote` in process `pid` (rank `peer`) into `local`, or `local` to `remote`.
// PeerError naming the rank when its process is gone; CommError on any other failure.
void ReadPeer(int64_t pid, int peer, const void* remote, void* local, size_t bytes);
void WritePeer(int64_t pid, int peer, const void* local, void* remote, size_t bytes);

}  // namespace pycomm
