// One-shot reduce-scatter and allgather through shared memory, as the one-shot allreduce
// (allreduce_oneshot.cc): for each piece, every rank copies its input into its arena slot and
// posts the call's sequence number; once every rank has posted, each reads what it needs from
// every slot. One synchronisation per piece and no messages: the latency algorithms.

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "core/agreement.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

bool OneShotTakesOthers(Algorithm algorithm, bool broadcast, size_t bytes, int ranks, bool single_copy) {
  if (algorithm != Algorithm::kAuto) return algorithm == Algorithm::kOneShot;
  // Cut-overs measured on the 2-core VM (docs/algorithms.md). At P = 2 single-copy wins from
  // 16 KiB; without it the ring reduce-scatter and the broadcast chain win from 64 KiB (the ring
  // allgather only above 128 KiB: one cut-over keeps the rule simple). At P = 4 (2 cores) the
  // one-shots win up to 256 KiB, and the broadcast's at every size measured (to 64 MiB: its
  // pieces stay in cache, where single-copy's readers each read the root's buffer from memory).
  if (ranks > 2) return broadcast || bytes <= size_t{256} << 10;
  return bytes <= (single_copy ? size_t{12} << 10 : size_t{32} << 10);
}

void ReduceScatterOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t recv_count, DataType dtype,
                          ReduceOp op) {
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  const size_t es = DataTypeSize(dtype);
  // A piece holds the same elements of every block, so each rank's slot holds P of them.
  const size_t piece = arena.slot_bytes() / es / P;
  if (!piece) throw std::logic_error("pycomm: an arena slot holds less than one element per rank");
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const auto mine = AgreementInfo(CallHeader{ctx.call, recv_count, static_cast<int32_t>(CallKind::kReduceScatter),
                                             static_cast<int32_t>(dtype), static_cast<int32_t>(op), -1},
                                  SharedArena::kOneShot);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  size_t begin = 0;
  do {  // at least one round, which checks the call, even with nothing to move
    const size_t n = std::min(piece, recv_count - begin);
    const uint64_t seq = ++*ctx.arena_seq;
    char* slot = arena.slot(r, seq);
    // Every block's piece is copied before the output is written, so recv may be this rank's
    // own block of send.
    for (int q = 0; q < P && n; ++q) std::memcpy(slot + q * n * es, in + (q * recv_count + begin) * es, n * es);
    arena.Post(seq, mine);
    arena.WaitAll(seq, ctx.timeout_s);
    if (begin == 0) CheckCallsAgree(arena, seq, mine);
    if (n) {
      // Block r's piece from every slot, reduced in rank order: the bits of the allreduce's.
      const size_t at = r * n * es;
      char* dst = out + begin * es;
      reduce(arena.slot(0, seq) + at, arena.slot(1, seq) + at, dst, n);
      for (int q = 2; q < P; ++q) reduce(dst, arena.slot(q, seq) + at, dst, n);
      if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
    }
    begin += n;
  } while (begin < recv_count);
}

void AllgatherOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t send_count, DataType dtype) {
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  const size_t es = DataTypeSize(dtype);
  const size_t piece = arena.slot_bytes() / es;
  const auto mine = AgreementInfo(
      CallHeader{ctx.call, send_count, static_cast<int32_t>(CallKind::kAllgather), static_cast<int32_t>(dtype), -1, -1},
      SharedArena::kOneShot);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  size_t begin = 0;
  do {
    const size_t n = std::min(piece, send_count - begin);
    const uint64_t seq = ++*ctx.arena_seq;
    // Copied before any output is written, so send may be this rank's own block of recv.
    if (n) std::memcpy(arena.slot(r, seq), in + begin * es, n * es);
    arena.Post(seq, mine);
    arena.WaitAll(seq, ctx.timeout_s);
    if (begin == 0) CheckCallsAgree(arena, seq, mine);
    for (int q = 0; q < P && n; ++q) std::memcpy(out + (q * send_count + begin) * es, arena.slot(q, seq), n * es);
    begin += n;
  } while (begin < send_count);
}

}  // namespace pycomm
