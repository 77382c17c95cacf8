// Reduce-scatter and allgather between the ranks of one node by direct access to each other's
// memory (process_vm_readv), with the steps the single-copy allreduce uses
// (allreduce_single_copy.cc): one arena round to agree and publish the buffers, the copies, one
// round so that nobody returns while a peer still reads its input.
//   reduce-scatter: rank r reads its block from every peer's input, chunk by chunk into cache,
//                   and reduces them in rank order into its output: (P-1)/P n bytes read from
//                   peers against the ring's (P-1)/P n sent and received, and no temporary.
//   allgather:      rank r reads every peer's input straight into its block of the output.

#include <cstring>
#include <vector>

#include "core/agreement.h"
#include "core/collectives.h"
#include "core/single_copy.h"
#include "transport/peer_memory.h"

namespace pycomm {

bool ReduceScatterSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                             size_t recv_count, DataType dtype, ReduceOp op) {
  const auto mine = SingleCopyCall(ctx, CallKind::kReduceScatter, recv_count, dtype, static_cast<int32_t>(op));
  std::vector<PeerBuffers> peers;
  if (!StartSingleCopy(ctx, state, mine, send, recv, &peers)) return false;
  const size_t begin = static_cast<size_t>(ctx.transport.rank()) * recv_count;
  // recv may be this rank's own block of send (in place): each chunk is read before it is written.
  ReduceFromPeers(ctx, state, peers, send, static_cast<char*>(recv), begin, begin + recv_count, dtype, op,
                  [](const char*, size_t, size_t) {});
  FinishSingleCopy(ctx, mine);
  return true;
}

bool AllgatherSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                         size_t send_count, DataType dtype) {
  const auto mine = SingleCopyCall(ctx, CallKind::kAllgather, send_count, dtype, -1);
  std::vector<PeerBuffers> peers;
  if (!StartSingleCopy(ctx, state, mine, send, recv, &peers)) return false;
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const size_t bytes = send_count * DataTypeSize(dtype);
  char* out = static_cast<char*>(recv);
  // A peer's input may be its own block of its output (in place): this rank reads it, and only
  // its owner writes it, before the call starts.
  if (bytes && out + r * bytes != send) std::memmove(out + r * bytes, send, bytes);
  for (int k = 1; k < P; ++k) {
    const int q = (r + k) % P;
    ReadPeer(peers[q].pid, q, peers[q].send, out + q * bytes, bytes);
  }
  FinishSingleCopy(ctx, mine);
  return true;
}

}  // namespace pycomm
