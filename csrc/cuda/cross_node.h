// The link between nodes for device collectives. Inside a node one leader rank holds the node's
// part of a collective in GPU memory (device_collectives.cc); the leaders of all nodes combine
// their parts here. Through a CUDA-aware MPI straight from GPU memory when the MPI reports that it
// is one, else through pinned host memory and pycomm's CPU engine, in pieces, so that copying one
// piece between GPU and host overlaps the ring on another.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/collectives.h"
#include "cuda/scratch.h"
#include "pycomm/pycomm.h"
#include "transport/transport.h"

namespace pycomm::cuda {

class CrossNode {
 public:
  // `leaders` holds one rank per node, in node order, and outlives this. `through_mpi`: MPI moves
  // GPU memory itself (a CUDA-aware MPI), the same on every leader. `arena_seq`: where `leaders`
  // is a whole communicator on one node (every rank its own group: no CUDA IPC), the counter of
  // its arena's rounds, so that the host step takes the node's shared-memory algorithms instead
  // of the ring; `algorithm` (PYCOMM_ALGO) there forces one of them, or the ring, as it does for
  // host arrays. Creates events on the current device; no communication.
  CrossNode(Transport& leaders, size_t chunk_bytes, double timeout_s, bool through_mpi, uint64_t* arena_seq = nullptr,
            Algorithm algorithm = Algorithm::kAuto);
  ~CrossNode();
  CrossNode(const CrossNode&) = delete;
  CrossNode& operator=(const CrossNode&) = delete;

  int node() const { return leaders_.rank(); }
  int nodes() const { return leaders_.size(); }

  // What stops a node from going on with a call.
  enum Trouble : int64_t { kNone = 0, kFailed = 1, kMismatch = 2 };
  // Every leader tells what stops its node, if anything, and what call it makes (`signature`):
  // MismatchError on every other leader if the calls differ (between nodes or inside one),
  // CommError if some node failed. Before every call's data crosses, so that no leader waits
  // for one that has failed. A leader with trouble of its own returns and raises its own error.
  // `describe` names this node's call, for the error only.
  void Agree(uint64_t signature, Trouble trouble, const std::function<std::string()>& describe);

  // Pinned host memory for a call to come (the sizes below), reserved before Agree so that a
  // failure to get it is agreed on too.
  void ReservePinned(size_t bytes) {
    if (bytes) pinned_.Reserve(bytes);
  }
  // None where MPI moves the data itself (a CUDA-aware MPI and a dtype it has).
  size_t AllreducePinnedBytes(size_t count, DataType dtype) const;
  size_t BroadcastPinnedBytes(size_t bytes) const { return bytes; }
  size_t AllgatherPinnedBytes(size_t block) const { return block * nodes(); }
  size_t ReduceScatterPinnedBytes(size_t count, DataType dtype) const;
  // Whether MPI moves GPU memory itself here (else everything goes through pinned host memory).
  bool through_mpi() const { return through_mpi_; }

  // Each leader's `data` (GPU memory, `count` elements) becomes the reduction over all leaders,
  // the same bits on every leader. `op` must not be kAvg: the caller sums and divides once.
  // Work is queued on `stream`; the host waits for it only where the data must cross through it.
  void Allreduce(void* data, size_t count, DataType dtype, ReduceOp op, cudaStream_t stream);
  // `data` (GPU memory) holds nodes() blocks of `count` elements; block i of the reduction over
  // all leaders lands in leader i's `out` (GPU memory, `count` elements). Through pinned host
  // memory, in pieces: piece k of every block goes to the host in one strided copy, is
  // reduce-scattered there, and only this leader's part comes back. `op` must not be kAvg.
  void ReduceScatter(const void* data, void* out, size_t count, DataType dtype, ReduceOp op, cudaStream_t stream);
  // Leader `root`'s `bytes` of `data` to every leader.
  void Broadcast(void* data, size_t bytes, int root, cudaStream_t stream);
  // `data` holds nodes() blocks of `block` bytes; leader i's block i goes to every leader (on one
  // node's arena, single-copy where every rank can read the others' memory; else the ring).
  void Allgather(void* data, size_t block, cudaStream_t stream);

 private:
  CollectiveContext Context();
  // Agree's one arena round, where the leaders share one node's arena.
  void AgreeInArena(uint64_t signature, Trouble trouble, const std::function<std::string()>& describe);
  // Agree's verdict, from the worst trouble of all and whether every signature equals this one's.
  void Settle(Trouble trouble, int64_t worst, bool same, const std::function<std::string()>& describe) const;
  // The leaders are one node's ranks, sharing its arena (in the communicator's rounds).
  bool OnOneNodeArena() const { return arena_seq_ != &own_arena_seq_; }
  // Allreduce of host memory in place among the leaders: on one node's arena, the one-shot for
  // small pieces and single-copy above it (where every rank can read the others' memory), unless
  // algorithm_ forces one; else the ring.
  void HostAllreduce(void* data, size_t count, DataType dtype, ReduceOp op);
  // The same choice for a reduce-scatter of host memory: `in` holds nodes() blocks of `count`.
  void HostReduceScatter(const void* in, void* out, size_t count, DataType dtype, ReduceOp op);
  // Whether single-copy may run (on one node's arena, where it has not been found unavailable).
  bool MaySingleCopy() const;
  // Elements of each block in one piece of a reduce-scatter through the host.
  size_t ReduceScatterPiece(size_t count, DataType dtype) const;
  void DestroyEvents();
  // The two pinned buffers of an allreduce through the host.
  static size_t StagingBytes(size_t count, DataType dtype);
  // Runs `pieces` pieces through the two pinned buffers (piece i in buffer i % 2): copy_in(i)
  // queues piece i's copy to the host; once it has arrived, on_host(i) works on it and queues its
  // copy back. The next piece's copy to the host overlaps the host's work on this one.
  void ThroughHostInPieces(size_t pieces, cudaStream_t stream, const std::function<void(size_t)>& copy_in,
                           const std::function<void(size_t)>& on_host);
  // Blocks until the work queued on `stream` so far has run (with the usual time-out).
  void Sync(cudaStream_t stream);
  // Waits, on `stream`, until the last call's copies out of the pinned buffer have run.
  char* Pinned(size_t bytes, cudaStream_t stream);

  Transport& leaders_;
  size_t chunk_bytes_;
  double timeout_s_;
  size_t max_pitch_ = 0;  // the largest pitch a strided copy takes on this device
  bool through_mpi_ = false;
  std::vector<char> ring_scratch_;
  uint64_t own_arena_seq_ = 0;  // the ring's contexts need one; it never takes an arena round
  uint64_t* arena_seq_;         // the communicator's, where it shares `leaders`' arena; else own_arena_seq_
  Algorithm algorithm_;
  SingleCopyState single_copy_;
  Scratch pinned_{Memory::kPinnedHost};
  cudaEvent_t copied_[2] = {nullptr, nullptr};  // a piece has reached the pinned buffer
  cudaEvent_t pinned_free_ = nullptr;           // the last call's copies out of it have run
};

}  // namespace pycomm::cuda
