// Single-copy allreduce between the ranks of one node, on ordinary (private) buffers: ranks read
// and write each other's memory with process_vm_readv / process_vm_writev
// (transport/peer_memory.h), so no byte passes through a shared segment or a message.
//   1. Arena round: the ranks agree on the call and publish pid, input and output addresses.
//   2. Rank r owns block r. Chunk by chunk it reads each peer's piece of the block into a buffer
//      that stays in cache, reduces all ranks' pieces in rank order into its own output, and
//      writes the finished chunk, still in cache, into every peer's output.
//   3. Arena round: nobody returns, and so frees or reuses its buffers, before every block is
//      written everywhere and no peer reads its input any more.
// Per rank: n bytes read (n/P of them locally), n written (n/P locally), each byte that crosses
// processes copied once by the kernel; two synchronisations per call.
//
// Only block r's owner touches block r, on any rank, and it reads each chunk of every input
// before it writes that chunk of any output: in place (send == recv, here or at a peer) is safe.
//
// The first call probes whether every rank can access every other's memory (kernel, Yama,
// seccomp, PYCOMM_CMA=0) and the ranks agree on the answer in one more round, so that all of
// them take the same path for the life of the communicator.

#include <vector>

#include "core/agreement.h"
#include "core/blocks.h"
#include "core/collectives.h"
#include "core/single_copy.h"
#include "transport/peer_memory.h"

namespace pycomm {

bool AllreduceSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                         size_t count, DataType dtype, ReduceOp op) {
  const auto mine = SingleCopyCall(ctx, CallKind::kAllreduce, count, dtype, static_cast<int32_t>(op));
  std::vector<PeerBuffers> peers;
  if (!StartSingleCopy(ctx, state, mine, send, recv, &peers)) return false;
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const size_t es = DataTypeSize(dtype);
  const BlockLayout layout(count, P);
  const size_t begin = layout.offset(r);
  ReduceFromPeers(ctx, state, peers, send, static_cast<char*>(recv) + begin * es, begin, begin + layout.length(r),
                  dtype, op, [&](const char* chunk, size_t element, size_t n) {
                    for (int k = 1; k < P; ++k) {
                      const int q = (r + k) % P;
                      WritePeer(peers[q].pid, q, chunk, peers[q].recv + element * es, n * es);
                    }
                  });
  FinishSingleCopy(ctx, mine);
  return true;
}

}  // namespace pycomm
