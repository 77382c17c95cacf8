// What the single-copy collectives (allreduce_single_copy.cc, scatter_gather_single_copy.cc)
// share: the arena round that starts a call, the one that ends it, and the reduction of one
// block read straight from every rank's input.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/agreement.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

// Where a rank's buffers of the current call live, as its peers address them.
struct PeerBuffers {
  int64_t pid;
  const char* send;
  char* recv;
  uint64_t* probe;  // a word every peer may read and write back unchanged
};

// Step 1: one arena round in which every rank posts `mine` and its buffers; MismatchError on
// every rank unless all made the same call. At the communicator's first single-copy call, a
// second round agrees on whether every rank can access every other's memory. Returns false on
// every rank, before any data moved, where some rank cannot; else the ranks' buffers.
bool StartSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const SharedArena::CallInfo& mine,
                     const void* send, void* recv, std::vector<PeerBuffers>* peers);

// The last step: nobody returns, and so frees or reuses its buffers, while a peer may still
// access them.
void FinishSingleCopy(const CollectiveContext& ctx, const SharedArena::CallInfo& mine);

// The CallInfo a single-copy call posts.
SharedArena::CallInfo SingleCopyCall(const CollectiveContext& ctx, CallKind kind, size_t count, DataType dtype,
                                     int32_t op);

// For P > 1: reduces elements [begin, end) of every rank's input (peers[q].send, this rank's `send`) in
// rank order into out[0, end - begin), chunk by chunk through state.buffer, which stays in
// cache; for avg also divides. After each chunk calls `finished(chunk, element, n)`: the chunk,
// now in `out`, starts at element `element` of the range of n elements. Each chunk of every
// input is read before that chunk of `out` is written, so `out` may be this rank's input.
template <typename Finished>
void ReduceFromPeers(const CollectiveContext& ctx, SingleCopyState& state, const std::vector<PeerBuffers>& peers,
                     const void* send, char* out, size_t begin, size_t end, DataType dtype, ReduceOp op,
                     Finished finished);

// What ReduceFromPeers runs for one chunk (below, so that the template stays short).
void ReduceChunk(const std::vector<PeerBuffers>& peers, int rank, const char* send, char* dst, size_t element, size_t n,
                 DataType dtype, ReduceFn reduce, char* acc, char* incoming);

// Elements per chunk, at most ctx.chunk_bytes.
size_t SingleCopyChunk(const CollectiveContext& ctx, size_t element_size);

template <typename Finished>
void ReduceFromPeers(const CollectiveContext& ctx, SingleCopyState& state, const std::vector<PeerBuffers>& peers,
                     const void* send, char* out, size_t begin, size_t end, DataType dtype, ReduceOp op,
                     Finished finished) {
  const size_t es = DataTypeSize(dtype), chunk = SingleCopyChunk(ctx, es);
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const int P = static_cast<int>(peers.size()), r = ctx.transport.rank();
  state.buffer.resize(2 * chunk * es);
  for (size_t at = begin; at < end; at += chunk) {
    const size_t n = std::min(chunk, end - at);
    char* dst = out + (at - begin) * es;
    ReduceChunk(peers, r, static_cast<const char*>(send), dst, at, n, dtype, reduce, state.buffer.data(),
                state.buffer.data() + chunk * es);
    if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
    finished(dst, at, n);
  }
}

}  // namespace pycomm
