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
// The first call probes whether every rank can access every other's memory (kernel, Yama,
// seccomp, PYCOMM_CMA=0) and the ranks agree on the answer in one more round, so that all of
// them take the same path for the life of the communicator.

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/agreement.h"
#include "core/blocks.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/peer_memory.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

// Small enough that a chunk read from a peer is still in L2 when it is reduced and sent on;
// large enough that the per-call cost of process_vm_readv/writev (about 0.5 us) stays small.
// Measured at P = 2: 128-256 KiB beat 32-64 KiB by 5-18% (docs/algorithms.md).
constexpr size_t kChunkBytes = size_t{256} << 10;

// What each rank puts in its arena slot for step 1.
struct Published {
  int64_t pid;
  const char* send;
  char* recv;
  uint64_t* probe;  // a word every peer may read and write back unchanged
};

constexpr uint64_t kProbeValue = 0x70c0c0a0c0ffee01;
uint64_t probe_word = kProbeValue;

// One round in which each rank says whether it could access every peer's probe word; true on
// every rank iff true on all.
bool ProbeAgreed(const CollectiveContext& ctx, SharedArena& arena, const std::vector<Published>& peers,
                 const SharedArena::CallInfo& mine) {
  bool ok = true;
  for (int q = 0; q < arena.size(); ++q) {
    if (q == arena.rank()) continue;
    uint64_t value = 0;
    ok = ok && TryPeerAccess(peers[q].pid, peers[q].probe, &value, sizeof value) && value == kProbeValue;
  }
  const uint64_t seq = ++*ctx.arena_seq;
  *reinterpret_cast<uint8_t*>(arena.slot(arena.rank(), seq)) = ok ? 1 : 0;
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  for (int q = 0; q < arena.size(); ++q) ok = ok && *reinterpret_cast<const uint8_t*>(arena.slot(q, seq)) == 1;
  return ok;
}

}  // namespace

bool AllreduceSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const void* send, void* recv,
                         size_t count, DataType dtype, ReduceOp op) {
  if (state.status == SingleCopyState::kUnavailable) return false;
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  if (state.status == SingleCopyState::kUnknown) AllowPeerAccess();

  SharedArena::CallInfo mine{
      count, static_cast<int32_t>(dtype), static_cast<int32_t>(op), 0, 0, SharedArena::kSingleCopy, 0};
  mine.call_kind = static_cast<int32_t>(CallKind::kAllreduce);
  mine.call = ctx.call;
  uint64_t seq = ++*ctx.arena_seq;
  const Published self{static_cast<int64_t>(getpid()), static_cast<const char*>(send), static_cast<char*>(recv),
                       &probe_word};
  std::memcpy(arena.slot(r, seq), &self, sizeof self);
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  CheckCallsAgree(arena, seq, mine);
  // Copied out now: the slots are reused two rounds later.
  std::vector<Published> peers(P);
  for (int q = 0; q < P; ++q) std::memcpy(&peers[q], arena.slot(q, seq), sizeof(Published));

  if (state.status == SingleCopyState::kUnknown) {
    state.status = ProbeAgreed(ctx, arena, peers, mine) ? SingleCopyState::kAvailable : SingleCopyState::kUnavailable;
    if (state.status == SingleCopyState::kUnavailable) return false;
  }

  const size_t es = DataTypeSize(dtype);
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const BlockLayout layout(count, P);
  const size_t chunk = std::max<size_t>(1, std::min(ctx.chunk_bytes, kChunkBytes) / es);
  state.buffer.resize(2 * chunk * es);
  char* const acc = state.buffer.data();
  char* const incoming = acc + chunk * es;

  // Step 2. Block r is only ever touched by this rank: in place (send == recv, here or at a
  // peer) each chunk of an input is read before the same chunk of that output is written, and
  // only the last reduction of a chunk writes this rank's output.
  const size_t end = layout.offset(r) + layout.length(r);
  for (size_t begin = layout.offset(r); begin < end; begin += chunk) {
    const size_t n = std::min(chunk, end - begin), bytes = n * es, at = begin * es;
    auto input = [&](int q, char* into) -> const char* {
      if (q == r) return static_cast<const char*>(send) + at;
      ReadPeer(peers[q].pid, q, peers[q].send + at, into, bytes);
      return into;
    };
    char* dst = static_cast<char*>(recv) + at;
    const char* left = input(0, acc);
    for (int q = 1; q < P; ++q) {
      char* into = q == P - 1 ? dst : acc;
      reduce(left, input(q, incoming), into, n);
      left = into;
    }
    if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
    for (int k = 1; k < P; ++k) {
      const int q = (r + k) % P;
      WritePeer(peers[q].pid, q, dst, peers[q].recv + at, bytes);
    }
  }
  seq = ++*ctx.arena_seq;  // step 3
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  return true;
}

}  // namespace pycomm
