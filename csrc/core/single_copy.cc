// The steps that every single-copy collective shares (core/single_copy.h).

#include "core/single_copy.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "core/agreement.h"
#include "transport/peer_memory.h"

namespace pycomm {

namespace {

// Small enough that a chunk read from a peer is still in L2 when it is reduced and sent on;
// large enough that the per-call cost of process_vm_readv/writev (about 0.5 us) stays small.
// Measured at P = 2: 128-256 KiB beat 32-64 KiB by 5-18% (docs/algorithms.md).
constexpr size_t kChunkBytes = size_t{256} << 10;

constexpr uint64_t kProbeValue = 0x70c0c0a0c0ffee01;
uint64_t probe_word = kProbeValue;

// One round in which each rank says whether it could access every peer's probe word; true on
// every rank iff true on all.
bool ProbeAgreed(const CollectiveContext& ctx, SharedArena& arena, const std::vector<PeerBuffers>& peers,
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

SharedArena::CallInfo SingleCopyCall(const CollectiveContext& ctx, CallKind kind, size_t count, DataType dtype,
                                     int32_t op) {
  SharedArena::CallInfo info{count, static_cast<int32_t>(dtype), op, 0, 0, SharedArena::kSingleCopy, 0};
  info.call_kind = static_cast<int32_t>(kind);
  info.call = ctx.call;
  return info;
}

bool StartSingleCopy(const CollectiveContext& ctx, SingleCopyState& state, const SharedArena::CallInfo& mine,
                     const void* send, void* recv, std::vector<PeerBuffers>* peers) {
  if (state.status == SingleCopyState::kUnavailable) return false;
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  if (state.status == SingleCopyState::kUnknown) AllowPeerAccess();
  const uint64_t seq = ++*ctx.arena_seq;
  const PeerBuffers self{static_cast<int64_t>(getpid()), static_cast<const char*>(send), static_cast<char*>(recv),
                         &probe_word};
  std::memcpy(arena.slot(r, seq), &self, sizeof self);
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  CheckCallsAgree(arena, seq, mine);
  // Copied out now: the slots are reused two rounds later.
  peers->resize(P);
  for (int q = 0; q < P; ++q) std::memcpy(&(*peers)[q], arena.slot(q, seq), sizeof(PeerBuffers));
  if (state.status == SingleCopyState::kUnknown) {
    state.status = ProbeAgreed(ctx, arena, *peers, mine) ? SingleCopyState::kAvailable : SingleCopyState::kUnavailable;
  }
  return state.status == SingleCopyState::kAvailable;
}

void FinishSingleCopy(const CollectiveContext& ctx, const SharedArena::CallInfo& mine) {
  SharedArena& arena = *ctx.transport.arena();
  const uint64_t seq = ++*ctx.arena_seq;
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
}

size_t SingleCopyChunk(const CollectiveContext& ctx, size_t element_size) {
  return std::max<size_t>(1, std::min(ctx.chunk_bytes, kChunkBytes) / element_size);
}

void ReduceChunk(const std::vector<PeerBuffers>& peers, int rank, const char* send, char* dst, size_t element, size_t n,
                 DataType dtype, ReduceFn reduce, char* acc, char* incoming) {
  const size_t es = DataTypeSize(dtype), at = element * es, bytes = n * es;
  const int P = static_cast<int>(peers.size());
  auto input = [&](int q, char* into) -> const char* {
    if (q == rank) return send + at;
    ReadPeer(peers[q].pid, q, peers[q].send + at, into, bytes);
    return into;
  };
  // Only the last reduction writes dst, after every input chunk was read: dst may be this
  // rank's own input chunk.
  const char* left = input(0, acc);
  for (int q = 1; q < P; ++q) {
    char* into = q == P - 1 ? dst : acc;
    reduce(left, input(q, incoming), into, n);
    left = into;
  }
}

}  // namespace pycomm
