// Broadcast as a pipelined chain: root -> root+1 -> ... -> root-1. Each rank forwards a chunk as
// soon as it has arrived, so for large buffers every link is busy at once and the time approaches
// one buffer's transfer, whatever the size. Where the ranks share a node, broadcasts go through
// its arena instead (oneshot_collectives.cc: at P > 2 every size, at P = 2 small ones), or
// single-copy (here: each rank reads the root's buffer straight into its own).

#include <algorithm>
#include <deque>

#include "core/collectives.h"
#include "core/pipeline.h"
#include "core/single_copy.h"
#include "transport/peer_memory.h"

namespace pycomm {

void BroadcastChain(const CollectiveContext& ctx, void* buf, size_t bytes, int root) {
  Transport& transport = ctx.transport;
  const int P = transport.size(), r = transport.rank();
  const int position = (r - root + P) % P;
  const int prev = (r - 1 + P) % P, next = (r + 1) % P;
  const bool receives = position > 0, forwards = position < P - 1;
  const size_t chunks = (bytes + ctx.chunk_bytes - 1) / ctx.chunk_bytes;
  char* data = static_cast<char*>(buf);
  auto chunk = [&](size_t c) {
    return Span{data + c * ctx.chunk_bytes, std::min(ctx.chunk_bytes, bytes - c * ctx.chunk_bytes)};
  };

  std::vector<std::unique_ptr<Request>> recvs(kPipelineDepth);
  std::deque<std::unique_ptr<Request>> sends;
  auto post_recv = [&](size_t c) {
    Span span = chunk(c);
    recvs[c % kPipelineDepth] = transport.Irecv(prev, span.ptr, span.bytes);
  };
  if (receives) {
    for (size_t c = 0; c < chunks && c < kPipelineDepth; ++c) post_recv(c);
  }
  for (size_t c = 0; c < chunks; ++c) {
    if (receives) {
      Wait(*recvs[c % kPipelineDepth], ctx.timeout_s);
      if (c + kPipelineDepth < chunks) post_recv(c + kPipelineDepth);
    }
    if (forwards) {
      while (sends.size() >= kPipelineDepth) {
        Wait(*sends.front(), ctx.timeout_s);
        sends.pop_front();
      }
      Span span = chunk(c);
      sends.push_back(transport.Isend(next, span.ptr, span.bytes));
    }
  }
  for (auto& send : sends) Wait(*send, ctx.timeout_s);
}

bool BroadcastSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, void* buf, size_t count, DataType dtype,
                         int root) {
  auto mine = SingleCopyCall(ctx, CallKind::kBroadcast, count, dtype, -1);
  mine.root = root;
  std::vector<PeerBuffers> peers;
  if (!StartSingleCopy(ctx, state, mine, buf, buf, &peers)) return false;
  const size_t bytes = count * DataTypeSize(dtype);
  // Every rank reads the root's buffer straight into its own: one copy per byte received. The
  // last round keeps the root from returning (and reusing its buffer) while a peer still reads.
  if (ctx.transport.rank() != root && bytes) ReadPeer(peers[root].pid, root, peers[root].send, buf, bytes);
  FinishSingleCopy(ctx, mine);
  return true;
}

}  // namespace pycomm
