#include "core/agreement.h"

#include <string>

#include "pycomm/pycomm.h"

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

}  // namespace pycomm
