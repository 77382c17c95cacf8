// One-shot allreduce through shared memory. For each piece of the message:
//   1. copy this rank's input into its arena slot and post the call's sequence number;
//   2. wait until every rank has posted;
//   3. reduce every rank's slot, in rank order, into the output.
// No message is sent and no rank waits more than once per piece, which makes it the latency
// algorithm; it reads P times the data, so the ring takes over for large messages.

#include <algorithm>
#include <cstring>
#include <string>

#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

std::string Describe(const SharedArena::CallInfo& info) {
  return std::string("allreduce(") + DataTypeName(static_cast<DataType>(info.dtype)) + ", " +
         std::to_string(info.count) + ", " + ReduceOpName(static_cast<ReduceOp>(info.op)) + ")";
}

// Every rank sees every rank's info, so all of them raise together, before any reduction reads
// data of another call.
void CheckAgreement(const SharedArena& arena, uint64_t seq, const SharedArena::CallInfo& mine) {
  for (int q = 0; q < arena.size(); ++q) {
    SharedArena::CallInfo theirs = arena.info(q, seq);
    if (theirs.count != mine.count || theirs.dtype != mine.dtype || theirs.op != mine.op) {
      // Name the lowest disagreeing pair the same way on every rank.
      SharedArena::CallInfo first = arena.info(0, seq);
      int other = 1;
      while (other < arena.size()) {
        SharedArena::CallInfo o = arena.info(other, seq);
        if (o.count != first.count || o.dtype != first.dtype || o.op != first.op) break;
        ++other;
      }
      throw MismatchError("pycomm: ranks disagree: rank 0 called " + Describe(first) + ", rank " +
                          std::to_string(other) + " called " + Describe(arena.info(other, seq)));
    }
  }
}

}  // namespace

void AllreduceOneShot(const CollectiveContext& ctx, const void* send, void* recv, size_t count, DataType dtype,
                      ReduceOp op) {
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  const size_t es = DataTypeSize(dtype);
  const size_t piece = arena.slot_bytes() / es;
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const char* in = static_cast<const char*>(send);
  char* out = static_cast<char*>(recv);
  for (size_t begin = 0; begin < count; begin += piece) {
    const size_t n = std::min(piece, count - begin);
    const uint64_t seq = ++*ctx.arena_seq;
    // The input is copied before the output is written, so send == recv is fine.
    std::memcpy(arena.slot(r, seq), in + begin * es, n * es);
    const SharedArena::CallInfo mine{count, static_cast<int32_t>(dtype), static_cast<int32_t>(op)};
    arena.Post(seq, mine);
    arena.WaitAll(seq, ctx.timeout_s);
    if (begin == 0) CheckAgreement(arena, seq, mine);
    char* dst = out + begin * es;
    reduce(arena.slot(0, seq), arena.slot(1, seq), dst, n);
    for (int q = 2; q < P; ++q) reduce(dst, arena.slot(q, seq), dst, n);
    if (op == ReduceOp::kAvg) ScaleDown(dst, n, dtype, P);
  }
}

}  // namespace pycomm
