// The algorithms behind each collective. Each one talks to the Transport only; the communicator
// validates arguments and picks the algorithm.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "pycomm/pycomm.h"
#include "transport/transport.h"

namespace pycomm {

// What every algorithm needs besides its buffers.
struct CollectiveContext {
  Transport& transport;
  size_t chunk_bytes;   // pipeline granularity, at least kMinChunkBytes
  double timeout_s;     // bound on every single wait
  char* scratch;        // kPipelineDepth * chunk_bytes bytes that the algorithm may use
  uint64_t* arena_seq;  // calls made through transport.arena() so far, the same on every rank
  uint64_t call = 0;    // the call's number on its communicator, for MismatchError's message
};

// Chunks in flight at once in each direction: enough to overlap receiving, reducing and sending.
constexpr size_t kPipelineDepth = 4;

// Ring allreduce: reduce-scatter then allgather, each of size-1 steps, chunked and pipelined.
void AllreduceRing(const CollectiveContext& ctx, const void* send, void* recv, size_t count, DataType dtype,
                   ReduceOp op);

// The same ring allreduce, in place on `data` over `group`, without blocking: the returned
// request advances a step each time it is tested (for running beside other work). Each step
// moves one whole block: meant for pieces of a pipeline. Same bits as AllreduceRing's order.
std::unique_ptr<Request> StartRingAllreduce(Transport& group, void* data, size_t count, DataType dtype, ReduceOp op);

// One-shot allreduce through transport.arena(): every rank posts its data to its slot, then every
// rank reduces all slots in rank order, so results are bitwise identical. One synchronisation per
// piece of at most arena slot_bytes; each rank reads P times the data. For small messages.
void AllreduceOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t count, DataType dtype,
                      ReduceOp op);
// The same for reduce-scatter (each rank posts its whole input, piece by piece, and reduces its
// own block from every slot, in rank order) and allgather (each rank posts its block and copies
// every slot out). recv may be this rank's block of send (reduce-scatter), send this rank's block
// of recv (allgather). P >= 2.
void ReduceScatterOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t recv_count, DataType dtype,
                          ReduceOp op);
void AllgatherOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t send_count, DataType dtype);
// OneShotTakes for reduce-scatter, allgather and `broadcast` (BroadcastOneShot), whose call of
// `bytes` (its largest buffer) moves less than an allreduce's: against single-copy where it may
// run (`single_copy`), else against the ring or the chain.
bool OneShotTakesOthers(Algorithm algorithm, bool broadcast, size_t bytes, int ranks, bool single_copy);
// Whether `algorithm` has an allreduce of `bytes` among `ranks` ranks of one node take the
// one-shot: always where forced, never under the ring (or the hierarchy, the ring on one node) or
// forced single-copy, and under auto up to a cut-over that depends on whether the single-copy
// allreduce may take the next sizes (`single_copy`) or the ring must. One rule for every user.
bool OneShotTakes(Algorithm algorithm, size_t bytes, int ranks, bool single_copy);

// Where a call's buffer sits when it lives in a SharedBuffer (comm.empty): rank q's copy is at
// base + q * stride + offset.
struct SharedPlacement {
  uint32_t id = 0;  // 0: not in a shared buffer
  char* base = nullptr;
  size_t stride = 0;
  size_t offset = 0;
};

// Allreduce in place on data that every rank holds in the same SharedBuffer at the same offset:
// rank r reduces block r straight from every rank's copy and writes the result into every copy,
// so each rank reads and writes each byte once (the memory-traffic floor) and nothing is copied
// in or out. First checks, through the arena, that all ranks make the same call (MismatchError
// otherwise) and that all of them qualify; returns false on every rank if any does not, and the
// caller runs another algorithm.
bool AllreduceInSharedBuffer(const CollectiveContext& ctx, const SharedPlacement& placement, bool in_place,
                             size_t count, DataType dtype, ReduceOp op);

struct Hierarchy;

// Hierarchical allreduce over the groups of `hierarchy` (core/hierarchy.h): reduce-scatter inside
// each node through shared memory, allreduce of each slice across nodes (`inter`), allgather
// inside each node; in pieces, pipelined. ctx.transport is the whole communicator.
void AllreduceHierarchical(const CollectiveContext& ctx, Hierarchy& hierarchy, InterNode inter, const void* send,
                           void* recv, size_t count, DataType dtype, ReduceOp op);

// What the single-copy allreduce keeps between calls on one communicator.
struct SingleCopyState {
  // Whether every rank can read every other's memory: probed at the first call, agreed by all.
  enum Status { kUnknown, kAvailable, kUnavailable } status = kUnknown;
  std::vector<char> buffer;  // the chunks read from peers
};

// Allreduce on ordinary buffers of ranks that share a node and transport.arena(): rank r reads
// its peers' pieces of block r straight from their memory (process_vm_readv), reduces them in
// rank order into its output, then reads the other finished blocks from their owners' outputs.
// Checks through the arena that all ranks make the same call (MismatchError otherwise). Returns
// false on every rank, having moved no data, where some rank cannot read its peers' memory; the
// caller then runs another algorithm.
bool AllreduceSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                         size_t count, DataType dtype, ReduceOp op);

// The same steps for reduce-scatter (rank r reads and reduces block r of every rank's input) and
// allgather (rank r reads every peer's input into its output). Same contract: false on every
// rank, nothing moved, where some rank cannot access its peers' memory.
bool ReduceScatterSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                             size_t recv_count, DataType dtype, ReduceOp op);
bool AllgatherSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                         size_t send_count, DataType dtype);
// Broadcast the same way: each rank reads the root's buffer into its own, between the first and
// last arena rounds. False on every rank, before anything moved, where some rank cannot (the
// caller then takes the chain).
bool BroadcastSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, void* buf, size_t count, DataType dtype,
                         int root);

// Ring reduce-scatter of size * recv_count elements; this rank's block lands in recv.
void ReduceScatterRing(const CollectiveContext& ctx, const void* send, void* recv, size_t recv_count, DataType dtype,
                       ReduceOp op);

// Ring allgather of send_count elements per rank.
void AllgatherRing(const CollectiveContext& ctx, const void* send, void* recv, size_t send_count, DataType dtype);

// Pipelined chain from root through every rank in ring order.
void BroadcastChain(const CollectiveContext& ctx, void* buf, size_t bytes, int root);
// Broadcast through transport.arena(), piece by piece: root posts its piece, every rank posts
// (agreeing on the call), then copies root's. For small messages; P >= 2.
void BroadcastOneShot(const CollectiveContext& ctx, void* buf, size_t count, DataType dtype, int root);

}  // namespace pycomm
