#include "core/agreement.h"

#include <cstring>
#include <string>
#include <tuple>

#include "pycomm/pycomm.h"
#include "transport/wait.h"

namespace pycomm {

namespace {

std::string Describe(const SharedArena::CallInfo& info) {
  if (info.kind == SharedArena::kAllocate) return "empty(" + std::to_string(info.count) + " bytes)";
  std::string call = std::string("allreduce(") + DataTypeName(static_cast<DataType>(info.dtype)) + ", " +
                     std::to_string(info.count) + ", " + ReduceOpName(static_cast<ReduceOp>(info.op)) + ")";
  return call + (info.kind == SharedArena::kOneShot ? " [one-shot]" : " [large]");
}

bool Same(const SharedArena::CallInfo& a, const SharedArena::CallInfo& b) {
  return a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && a.op == b.op;
}

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
