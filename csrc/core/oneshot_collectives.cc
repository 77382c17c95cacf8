// One-shot reduce-scatter, allgather and broadcast through shared memory, as the one-shot
// allreduce (allreduce_oneshot.cc): for each piece, every rank copies its input into its arena
// slot and posts the call's sequence number; once every rank has posted, each reads what it
// needs from every slot. One synchronisation per piece and no messages: the latency algorithms.

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "core/agreement.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

// The rounds of a one-shot: one per piece of `count` elements, `piece` at most, and at least one,
// which checks the call (even with nothing to move). fill(slot, begin, n) writes this rank's part
// of the piece into its slot before it posts; drain(seq, begin, n) reads every rank's, once all
// have posted.
template <typename Fill, typename Drain>
void OneShotRounds(const CollectiveContext& ctx, const SharedArena::CallInfo& mine, size_t count, size_t piece,
                   Fill fill, Drain drain) {
  SharedArena& arena = *ctx.transport.arena();
  size_t begin = 0;
  do {
    const size_t n = std::min(piece, count - begin);
    const uint64_t seq = ++*ctx.arena_seq;
    if (n) fill(arena.slot(arena.rank(), seq), begin, n);
    arena.Post(seq, mine);
    arena.WaitAll(seq, ctx.timeout_s);
    if (begin == 0) CheckCallsAgree(arena, seq, mine);
    if (n) drain(seq, begin, n);
    begin += n;
  } while (begin < count);
}

SharedArena::CallInfo OneShotInfo(const CollectiveContext& ctx, CallKind kind, size_t count, DataType dtype, int32_t op,
                                  int32_t root) {
  return AgreementInfo(CallHeader{ctx.call, count, static_cast<int32_t>(kind), static_cast<int32_t>(dtype), op, root},
                       SharedArena::kOneShot);
}

}  // namespace

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
  const SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  const size_t es = DataTypeSize(dtype);
  // A piece holds the same elements of every block, so each rank's slot holds P of them.
  const size_t piece = arena.slot_bytes() / es / P;
  if (!piece) throw std::logic_error("pycomm: an arena slot holds less than one element per rank");
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  OneShotRounds(
      ctx, OneShotInfo(ctx, CallKind::kReduceScatter, recv_count, dtype, static_cast<int32_t>(op), -1), recv_count,
      piece,
      // Every block's piece is copied before the output is written, so recv may be this rank's
      // own block of send.
      [&](char* slot, size_t begin, size_t n) {
        for (int q = 0; q < P; ++q) std::memcpy(slot + q * n * es, in + (q * recv_count + begin) * es, n * es);
      },
      // Block r's piece from every slot, reduced in rank order: the bits of the allreduce's.
      [&](uint64_t seq, size_t begin, size_t n) {
        const size_t at = r * n * es;
        char* dst = out + begin * es;
        reduce(arena.slot(0, seq) + at, arena.slot(1, seq) + at, dst, n);
        for (int q = 2; q < P; ++q) reduce(dst, arena.slot(q, seq) + at, dst, n);
        if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
      });
}

void AllgatherOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t send_count, DataType dtype) {
  const SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size();
  const size_t es = DataTypeSize(dtype);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  OneShotRounds(
      ctx, OneShotInfo(ctx, CallKind::kAllgather, send_count, dtype, -1, -1), send_count, arena.slot_bytes() / es,
      // Copied before any output is written, so send may be this rank's own block of recv.
      [&](char* slot, size_t begin, size_t n) { std::memcpy(slot, in + begin * es, n * es); },
      [&](uint64_t seq, size_t begin, size_t n) {
        for (int q = 0; q < P; ++q) std::memcpy(out + (q * send_count + begin) * es, arena.slot(q, seq), n * es);
      });
}

void BroadcastOneShot(const CollectiveContext& ctx, void* buf, size_t count, DataType dtype, int root) {
  const SharedArena& arena = *ctx.transport.arena();
  const bool is_root = arena.rank() == root;
  const size_t es = DataTypeSize(dtype);
  char* data = static_cast<char*>(buf);
  OneShotRounds(
      ctx, OneShotInfo(ctx, CallKind::kBroadcast, count, dtype, -1, root), count, arena.slot_bytes() / es,
      [&](char* slot, size_t begin, size_t n) {
        if (is_root) std::memcpy(slot, data + begin * es, n * es);
      },
      [&](uint64_t seq, size_t begin, size_t n) {
        if (!is_root) std::memcpy(data + begin * es, arena.slot(root, seq), n * es);
      });
}

}  // namespace pycomm
