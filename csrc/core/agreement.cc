#include "core/agreement.h"

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/hierarchy.h"
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
  std::string path;
  if (h.path == SharedArena::kOneShot) path = " [one-shot]";
  if (h.path == SharedArena::kLargeAllreduce) path = " [large]";
  if (h.path == SharedArena::kHierarchical) path = h.variant ? " [hierarchical, ring]" : " [hierarchical, mpi]";
  if (h.path == SharedArena::kSingleCopy) path = " [single-copy]";
  return std::string(KindName(h.kind)) + "(" + args + ") #" + std::to_string(h.seq) + path;
}

// What a rank posted in an arena, in the words of a header, with the step that posted it.
CallHeader AsHeader(const SharedArena::CallInfo& info) {
  return CallHeader{info.call, info.count, info.call_kind, info.dtype, info.op, info.root, info.kind, info.variant};
}

std::string Describe(const SharedArena::CallInfo& info) {
  if (info.kind == SharedArena::kAllocate) {
    return "empty(" + std::to_string(info.count) + " bytes) #" + std::to_string(info.call);
  }
  if (info.kind == SharedArena::kDeviceHandoff || info.kind == SharedArena::kDeviceAgreement) {
    return "a collective on device arrays";
  }
  return Describe(AsHeader(info));
}

bool Same(const SharedArena::CallInfo& a, const SharedArena::CallInfo& b) {
  return a.kind == b.kind && a.count == b.count && a.dtype == b.dtype && a.op == b.op && a.root == b.root &&
         a.call_kind == b.call_kind && a.call == b.call && a.variant == b.variant;
}

auto Key(const CallHeader& h) { return std::tie(h.seq, h.kind, h.count, h.dtype, h.op, h.root, h.path, h.variant); }

// The smallest and largest header seen so far, each with the lowest rank that made it: a
// total order, so every rank ends with the same pair whatever the order of the rounds.
// Sent as raw bytes between ranks of one build.
struct Extremes {
  CallHeader low, high;
  int32_t low_rank, high_rank;
};

static_assert(std::is_trivially_copyable_v<Extremes>, "sent as bytes");

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

namespace {

// Dissemination over `transport`, starting from `seen`: every rank ends with the smallest and the
// largest header of all that any rank started from, each with the lowest rank that made it.
Extremes Disseminate(Transport& transport, double timeout_s, Extremes seen) {
  const int P = transport.size(), r = transport.rank();
  for (int k = 1; k < P; k *= 2) {
    Extremes incoming{};
    auto recv = transport.Irecv((r - k + P) % P, &incoming, sizeof incoming);
    auto send = transport.Isend((r + k) % P, &seen, sizeof seen);
    Wait(*send, timeout_s);
    Wait(*recv, timeout_s);
    Merge(seen, incoming);
  }
  return seen;
}

void ThrowUnlessAgreed(const Extremes& seen) {
  if (Key(seen.low) == Key(seen.high)) return;
  throw MismatchError("pycomm: ranks disagree: rank " + std::to_string(seen.low_rank) + " called " +
                      Describe(seen.low) + ", rank " + std::to_string(seen.high_rank) + " called " +
                      Describe(seen.high));
}

}  // namespace

SharedArena::CallInfo AgreementInfo(const CallHeader& header, uint16_t kind) {
  SharedArena::CallInfo info{header.count, header.dtype, header.op, 0, 0, kind, 0};
  info.root = header.root;
  info.call_kind = header.kind;
  info.call = header.seq;
  info.variant = header.variant;
  return info;
}

void CheckHeadersAgree(const CollectiveContext& ctx, const CallHeader& mine) {
  Transport& transport = ctx.transport;
  const int r = transport.rank();
  if (transport.size() == 1) return;
  if (SharedArena* arena = transport.arena()) {
    // Through the arena, where the one-shot and shared-buffer steps post theirs: a rank on
    // another path (say a barrier against a small allreduce) shows up as a mismatch too.
    const SharedArena::CallInfo info = AgreementInfo(mine, SharedArena::kAgreement);
    const uint64_t seq = ++*ctx.arena_seq;
    arena->Post(seq, info);
    arena->WaitAll(seq, ctx.timeout_s);
    CheckCallsAgree(*arena, seq, info);
    return;
  }
  ThrowUnlessAgreed(Disseminate(transport, ctx.timeout_s, Extremes{mine, mine, r, r}));
}

void AgreeAcrossNodes(const Hierarchy& hierarchy, double timeout_s, uint64_t seq, const CallHeader& mine) {
  const int me = hierarchy.node_ranks[hierarchy.local_rank];
  Extremes seen{mine, mine, me, me};
  if (hierarchy.node) {
    // What every rank of this node posted in round `seq`, under its rank in the communicator.
    const SharedArena& arena = *hierarchy.node->arena();
    seen = Extremes{AsHeader(arena.info(0, seq)), AsHeader(arena.info(0, seq)), hierarchy.node_ranks[0],
                    hierarchy.node_ranks[0]};
    for (int q = 1; q < arena.size(); ++q) {
      const CallHeader h = AsHeader(arena.info(q, seq));
      Merge(seen, Extremes{h, h, hierarchy.node_ranks[q], hierarchy.node_ranks[q]});
    }
  }
  // Every group spans every node; a rank in several (on a node with fewer ranks) takes part in
  // each, in ascending order like every other member, so no group waits for it in vain.
  try {
    for (const auto& group : hierarchy.across) {
      if (group) seen = Disseminate(*group, timeout_s, seen);
    }
  } catch (const PeerError& e) {
    // Device calls agree across nodes another way, so a node in one meets this as silence.
    throw PeerError(std::string(e.what()) + ", agreeing on the call with the other nodes (" + Describe(mine) +
                        " here): a node may be gone, or in another call (a device call, say)",
                    e.peer());
  }
  ThrowUnlessAgreed(seen);
}

void CheckHeadersAgree(const CollectiveContext& ctx, Hierarchy& hierarchy, const CallHeader& mine) {
  uint64_t seq = 0;
  if (hierarchy.node) {
    SharedArena& arena = *hierarchy.node->arena();
    seq = ++hierarchy.node_seq;
    arena.Post(seq, AgreementInfo(mine, SharedArena::kAgreement));
    arena.WaitAll(seq, ctx.timeout_s);
  }
  CallHeader posted = mine;
  posted.path = SharedArena::kAgreement;
  AgreeAcrossNodes(hierarchy, ctx.timeout_s, seq, posted);
}

}  // namespace pycomm
