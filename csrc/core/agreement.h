// Checks that every rank is making the same call, before any of its data moves.
#pragma once

#include <cstdint>

#include "core/collectives.h"
#include "transport/shared_arena.h"

namespace pycomm {

// After arena.WaitAll(seq): throws MismatchError on every rank (all see the same infos) unless
// every rank posted the same count, dtype and op as `mine`.
void CheckCallsAgree(const SharedArena& arena, uint64_t seq, const SharedArena::CallInfo& mine);

// What a call over the transport is: compared across ranks before the algorithm starts.
enum class CallKind : int32_t { kAllreduce = 1, kReduceScatter, kAllgather, kBroadcast, kBarrier };

struct CallHeader {
  uint64_t seq;    // the call's number on this communicator (1, 2, ...), in issue order
  uint64_t count;  // elements (per rank for allgather, of the result block for reduce_scatter)
  int32_t kind;    // CallKind
  int32_t dtype;   // DataType, or -1
  int32_t op;      // ReduceOp, or -1
  int32_t root;    // broadcast root, or -1
  // Which step checks the call (a SharedArena::Kind; 0 for the flat exchange): ranks that would
  // move the data by different algorithms disagree.
  int32_t path = 0;
  // Within a path, how it moves the data where ranks could be set up differently (the
  // hierarchical allreduce: 1 when slices cross nodes by pycomm's ring, 0 by MPI's allreduce).
  int32_t variant = 0;
};

// Where the ranks share an arena: one flag round through it (kAgreement), checked like the
// one-shot's. Otherwise: exchanges headers in ceil(log2 P) dissemination rounds of one small
// message each, after which every rank knows the smallest and the largest header of all. If they differ, every rank
// throws the same MismatchError naming two ranks and their calls ("rank 0 called
// allreduce(float32, 10, sum) #17, rank 1 called allreduce(float32, 11, sum) #17"). Doubles as a
// barrier: no rank returns before every rank has entered.
void CheckHeadersAgree(const CollectiveContext& ctx, const CallHeader& mine);

struct Hierarchy;

// Where the ranks span nodes: one round through each node's arena, then, starting from what the
// node's ranks posted, a dissemination among the ranks of each slice group this rank is in
// (core/hierarchy.h). Every group holds a rank of every node, so every rank ends with the same
// smallest and largest call of all: ceil(log2 N) messages between nodes instead of
// ceil(log2 P), and the same MismatchError everywhere. Also a barrier.
void CheckHeadersAgree(const CollectiveContext& ctx, Hierarchy& hierarchy, const CallHeader& mine);

// Its second half, for the hierarchical allreduce, whose first node round (`seq`, posted with
// AgreementInfo) also carries its data. `mine` stands for the node where this rank is alone.
void AgreeAcrossNodes(const Hierarchy& hierarchy, double timeout_s, uint64_t seq, const CallHeader& mine);

// What a rank posts in an arena for `header` at a step of kind `kind`.
SharedArena::CallInfo AgreementInfo(const CallHeader& header, uint16_t kind);

}  // namespace pycomm
