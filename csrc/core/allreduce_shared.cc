// Zero-copy allreduce on arrays in a SharedBuffer (comm.empty). After one arena round in which
// the ranks agree on the call and on where the data lives, rank r takes block r in cache-sized
// chunks: it reduces the chunk from every rank's copy, in rank order, into a small buffer that
// stays in cache, then writes the result into every rank's copy. A second round tells everyone
// that all blocks are written. Each rank reads n/P * P = n bytes and writes n bytes: the floor.

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/agreement.h"
#include "core/blocks.h"
#include "core/collectives.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

constexpr size_t kChunkBytes = size_t{64} << 10;  // fits in L2 beside the streams it is built from

bool Qualifies(const SharedArena::CallInfo& a, const SharedArena::CallInfo& mine) {
  return a.shared_id != 0 && a.in_place && a.shared_id == mine.shared_id && a.shared_offset == mine.shared_offset;
}

}  // namespace

bool AllreduceInSharedBuffer(const CollectiveContext& ctx, const SharedPlacement& placement, bool in_place,
                             size_t count, DataType dtype, ReduceOp op) {
  SharedArena& arena = *ctx.transport.arena();
  const int P = arena.size(), r = arena.rank();
  SharedArena::CallInfo mine{count,
                             static_cast<int32_t>(dtype),
                             static_cast<int32_t>(op),
                             placement.id,
                             static_cast<uint16_t>(in_place ? 1 : 0),
                             SharedArena::kLargeAllreduce,
                             placement.offset};
  mine.call_kind = static_cast<int32_t>(CallKind::kAllreduce);
  mine.call = ctx.call;
  uint64_t seq = ++*ctx.arena_seq;
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  CheckCallsAgree(arena, seq, mine);
  // Every rank evaluates the same infos, so every rank takes the same branch.
  const SharedArena::CallInfo first = arena.info(0, seq);
  for (int q = 0; q < P; ++q) {
    if (!Qualifies(arena.info(q, seq), first)) return false;
  }

  const size_t es = DataTypeSize(dtype);
  const ReduceFn reduce = GetReduceFn(dtype, op);
  const BlockLayout layout(count, P);
  auto copy_of = [&](int q, size_t element) {
    return placement.base + q * placement.stride + placement.offset + element * es;
  };
  const size_t chunk = std::max<size_t>(1, kChunkBytes / es);
  std::vector<char> result(chunk * es);
  const size_t end = layout.offset(r) + layout.length(r);
  for (size_t begin = layout.offset(r); begin < end; begin += chunk) {
    const size_t n = std::min(chunk, end - begin);
    reduce(copy_of(0, begin), copy_of(1, begin), result.data(), n);
    for (int q = 2; q < P; ++q) reduce(result.data(), copy_of(q, begin), result.data(), n);
    if (op == ReduceOp::kAvg) ScaleDown(result.data(), n, dtype, P);
    for (int q = 0; q < P; ++q) std::memcpy(copy_of(q, begin), result.data(), n * es);
  }
  // Nobody returns (and so nobody touches its array) before every block is written everywhere.
  seq = ++*ctx.arena_seq;
  arena.Post(seq, mine);
  arena.WaitAll(seq, ctx.timeout_s);
  return true;
}

}  // namespace pycomm
