#include "core/agreement.h"

#include <cstring>
#include <string>
#include <tuple>

#include "pycomm/pycomm.h"
#include "transport/wait.h"

namespace pycomm {

namespace {

const char* KindName(int32_t kind) {
  switch (static_cast<CallKind>(kind)) {
    case CallKind::kAllreduce:
      return "allreduce";
    case CallKind::kReduceScatter:
      return "reduce_scatter";
    case CallKind::kAllgather:
      return "allgather";
    case CallKind::kBroadcast:
      return "broadcast";
    case CallKind::kBarrier:
      return "barrier";
  }
  return "unknown call";
}

std::string Describe(const CallHeader& h) {
  std::string args;
  if (h.dtype >= 0 && h.dtype < kNumDataTypes) args = DataTypeName(static_cast<DataType>(h.dtype));
  if (static_cast<CallKind>(h.kind) != CallKind::kBarrier) args += ", " + std::to_string(h.count);
  if (h.op >= 0 && h.op < kNumReduceOps) args += std::string(", ") + ReduceOpName(static_cast<ReduceOp>(h.op));
  if (h.root >= 0) args += ", root " + std::to_string(h.root);
  return std::string(KindName(h.kind)) + "(" + args + ") #" + std::to_string(h.seq);
}

// What a rank posted in the arena, in the words of a header, plus the step that posted it.
CallHeader AsHeader(const SharedArena::CallInfo& info) {
  return CallHeader{info.call, info.count, info.call_kind, info.dtype, info.op, info.root};
}

std::string Describe(const SharedArena::CallInfo& info) {
  switch (info.kind) {
    case SharedArena::kAllocate:
      return "empty(" + std::to_string(info.count) + " bytes) #" + std::to_string(info.call);
    case SharedArena::kOneShot:
      return Describe(AsHeader(info)) + " [one-shot]";
    case SharedArena::kLargeAllreduce:
      return Describe(AsHeader(info)) + " [large]";
    case SharedArena::kSingleCopy:
      return Describe(AsHeader(info)) + " [single-copy]";
    default:
      return Describe(AsHeader(info));
  }
}

bool Same(const SharedArena::CallInfo& a, const SharedArena::CallInfo& b) {
  return a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && a.op == b.op && a.root == b.root &&
         a.call_kind == b.call_kind && a.call == b.call;
}

auto Key(const CallHeader& h) { return std::tie(h.seq, h.kind, h.count, h.dtype, h.op, h.root); }

// The smallest and largest header seen so far, each with the lowest rank that made it: a
// total order, so every rank ends with the same pair whatever the order of the rounds.
struct Extremes {
  CallHeader low, high;
  int32_t low_rank, high_rank;
};

void Merge(Extremes& into, const Extremes& from) {
  if (std::make_tuple(Key(from.low), from.low_rank) < std::make_tuple(Key(into.low), into.low_rank)) {
    into.low = from.low;
    into.low_rank = from.low_rank;
  }
  // Highest header, lowest rank among those that made it.
  if (Key(from.high) > Key(into.high) || (Key(from.high) == Key(into.high) && from.high_rank < into.high_rank)) {
    into.high = from.high;
    into.high_rank = from.high_rank;
  }
}

}  // namespace

void CheckCallsAgree(const SharedArena& arena, uint64_t seq, const SharedArena::CallInfo& mine) {
  for (int q = 0; q < arena.size(); ++q) {
    if (Same(arena.info(q, seq), mine)) continue;
    // Name the lowest disagreeing pair, the same way on every rank.
    const SharedArena::CallInfo first = arena.info(0, seq);
    int other = 1;
    while (other < arena.size() && Same(arena.info(other, seq), first)) ++other;
    throw MismatchError("pycomm: ranks disagree: rank 0 called " + Describe(first) + ", rank " + std::to_string(other) +
                        " called " + Describe(arena.info(other, seq)));
  }
}

void CheckHeadersAgree(const CollectiveContext& ctx, const CallHeader& mine) {
  Transport& transport = ctx.transport;
  const int P = transport.size(), r = transport.rank();
  if (P == 1) return;
  if (SharedArena* arena = transport.arena()) {
    // Through the arena, where the one-shot and shared-buffer steps post theirs: a rank on
    // another path (say a barrier against a small allreduce) shows up as a mismatch too.
    SharedArena::CallInfo info{mine.count, mine.dtype, mine.op, 0, 0, SharedArena::kAgreement, 0};
    info.root = mine.root;
    info.call_kind = mine.kind;
    info.call = mine.seq;
    const uint64_t seq = ++*ctx.arena_seq;
    arena->Post(seq, info);
    arena->WaitAll(seq, ctx.timeout_s);
    CheckCallsAgree(*arena, seq, info);
    return;
  }
  Extremes seen{mine, mine, r, r};
  for (int k = 1; k < P; k *= 2) {
    Extremes incoming;
    std::memset(&incoming, 0, sizeof incoming);
    auto recv = transport.Irecv((r - k + P) % P, &incoming, sizeof incoming);
    auto send = transport.Isend((r + k) % P, &seen, sizeof seen);
    Wait(*send, ctx.timeout_s);
    Wait(*recv, ctx.timeout_s);
    Merge(seen, incoming);
  }
  if (Key(seen.low) == Key(seen.high)) return;
  throw MismatchError("pycomm: ranks disagree: rank " + std::to_string(seen.low_rank) + " called " +
                      Describe(seen.low) + ", rank " + std::to_string(seen.high_rank) + " called " +
                      Describe(seen.high));
}

}  // namespace pycomm
