// One-shot allreduce through shared memory. For each piece of the message:
//   1. copy this rank's input into its arena slot and post the call's sequence number;
//   2. wait until every rank has posted;
//   3. reduce every rank's slot, in rank order, into the output.
// No message is sent and no rank waits more than once per piece, which makes it the latency
// algorithm; it reads P times the data, so the ring takes over for large messages.

#include <algorithm>
#include <cstring>

#include "core/agreement.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {
size_t OneShotMaxBytes(int ranks, bool single_copy) {
  // Cut-overs measured on the 2-core VM (docs/algorithms.md). Above these the single-copy
  // allreduce (one kernel copy per byte moved, two synchronisations) beats the one-shot (a copy
  // into the arena, then P reads of everything, one synchronisation)...
  if (single_copy) return ranks == 2 ? size_t{12} << 10 : size_t{64} << 10;
  // ...and where the ranks cannot access each other's memory, above these the ring's 2(P-1)/P
  // bytes per rank beat the one-shot: its 2(P-1) dependent steps cost more as P grows.
  return ranks == 2 ? size_t{128} << 10 : size_t{512} << 10;
}
}  // namespace

bool OneShotTakes(Algorithm algorithm, size_t bytes, int ranks, bool single_copy) {
  switch (algorithm) {
    case Algorithm::kOneShot:
      return true;
    case Algorithm::kAuto:
      return bytes <= OneShotMaxBytes(ranks, single_copy);
    default:  // the ring, the hierarchy, forced single-copy
      return false;
  }
}

void AllreduceOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t count, DataType dtype,
                      ReduceOp op) {
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  const size_t es = DataTypeSize(dtype);
  const size_t piece = arena.slot_bytes() / es;
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  // An empty call still takes one round: the ranks must agree on it like any other.
  for (size_t begin = 0; begin == 0 || begin < count; begin += piece) {
    const size_t n = std::min(piece, count - begin);
    const uint64_t seq = ++*ctx.arena_seq;
    // The input is copied before the output is written, so send == recv is fine.
    if (n > 0) std::memcpy(arena.slot(r, seq), in + begin * es, n * es);
    SharedArena::CallInfo mine{
        count, static_cast<int32_t>(dtype), static_cast<int32_t>(op), 0, 0, SharedArena::kOneShot, 0};
    mine.call_kind = static_cast<int32_t>(CallKind::kAllreduce);
    mine.call = ctx.call;
    arena.Post(seq, mine);
    arena.WaitAll(seq, ctx.timeout_s);
    if (begin == 0) CheckCallsAgree(arena, seq, mine);
    char* dst = out + begin * es;
    reduce(arena.slot(0, seq), arena.slot(1, seq), dst, n);
    for (int q = 2; q < P; ++q) reduce(dst, arena.slot(q, seq), dst, n);
    if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
  }
}

}  // namespace pycomm
