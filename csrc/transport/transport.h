// The point-to-point interface that every algorithm talks to. An algorithm never knows whether
// bytes move through MPI, shared memory or an in-process loopback; a transport never knows which
// algorithm drives it.
//
// Ordering contract: messages between one (sender, receiver) pair match in the order they were
// posted on both sides, as MPI's non-overtaking rule guarantees on a single tag.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "pycomm/pycomm.h"

namespace pycomm {

class SharedArena;

class Request {
 public:
  virtual ~Request() = default;
  // Drives progress and returns true once the operation has completed. Must not block.
  // Throws PeerError if the peer is known to be gone.
  virtual bool Test() = 0;
  virtual int peer() const = 0;
  // Called by waits that have polled for a while: blocks until the request may have completed,
  // or for at most `limit`. The default sleeps for `limit`; a request that can be woken (a
  // futex on a flag in shared memory) returns as soon as it is.
  virtual void Sleep(std::chrono::microseconds limit);
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_rank() const { return rank(); }
  virtual int local_size() const { return size(); }
  // Non-blocking send and receive of raw bytes. The buffer must stay valid, and a send buffer
  // unmodified, until the request completes. A receive must be posted for exactly the bytes sent.
  virtual std::unique_ptr<Request> Isend(int peer, const void* buf, size_t bytes) = 0;
  virtual std::unique_ptr<Request> Irecv(int peer, void* buf, size_t bytes) = 0;
  // Human-readable name for debug output ("mpi", "loopback").
  virtual const char* name() const = 0;
  // Throws PeerError naming a rank whose process is known to have died; nothing where none is,
  // or where the transport does not watch its ranks' processes.
  virtual void CheckPeersAlive() {}
  // Memory shared by all ranks, for the intra-node algorithms; null when the ranks do not share
  // a node (or the memory could not be set up).
  virtual SharedArena* arena() { return nullptr; }
  // Collective: maps one new segment of `total_bytes` that every rank shares. Null (on every
  // rank) where the ranks do not all share a node.
  virtual std::shared_ptr<void> MapShared(size_t total_bytes) {
    (void)total_bytes;
    return nullptr;
  }

  // Which node `rank` is on: nodes are numbered 0, 1, ... in the order of their lowest rank, and
  // only ranks of one node share memory. The default is one node.
  virtual int node_of(int rank) const {
    (void)rank;
    return 0;
  }
  // Collective over exactly `ranks` (ascending, this rank among them): a transport among them, in
  // which ranks[i] is rank i. A rank that joins several groups must create them in the same order
  // as every other member, each with its own `tag`. Null where this transport cannot make one.
  virtual std::unique_ptr<Transport> Subgroup(const std::vector<int>& ranks, int tag) {
    (void)ranks;
    (void)tag;
    return nullptr;
  }
  // Whether Isend, Irecv and IallreduceInPlace may be given GPU memory (a CUDA-aware MPI).
  virtual bool accepts_device_memory() const { return false; }
  // Starts an allreduce of `buf` in place, run by the library beneath the transport (MPI's own
  // MPI_Iallreduce); null where it cannot reduce this dtype and op. kAvg reduces as kSum. Its
  // Request's peer() is -1.
  virtual std::unique_ptr<Request> IallreduceInPlace(void* buf, size_t count, DataType dtype, ReduceOp op) {
    (void)buf;
    (void)count;
    (void)dtype;
    (void)op;
    return nullptr;
  }
};

}  // namespace pycomm
