#include "core/hierarchy.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "transport/shared_arena.h"

namespace pycomm {

namespace {
// Tags of MPI_Comm_create_group: one for the node groups, one per slice group after it.
constexpr int kNodeGroupTag = 0x7100;
constexpr int kSliceGroupTag = 0x7200;

// True on every rank iff `ok` on all of them: an allreduce (min) of one int over the ring.
bool AllRanks(const CollectiveContext& ctx, bool ok) {
  int32_t flag = ok ? 1 : 0;
  AllreduceRing(ctx, &flag, &flag, 1, DataType::kInt32, ReduceOp::kMin);
  return flag == 1;
}

// Staging is sized from the chunk: ranks that disagree on it would map different sizes.
void CheckSameChunk(const CollectiveContext& ctx) {
  int64_t extremes[2] = {static_cast<int64_t>(ctx.chunk_bytes), -static_cast<int64_t>(ctx.chunk_bytes)};
  AllreduceRing(ctx, extremes, extremes, 2, DataType::kInt64, ReduceOp::kMax);
  if (extremes[0] != -extremes[1]) {
    throw CommError("pycomm: chunk_bytes differs between ranks (" + std::to_string(-extremes[1]) + " to " +
                    std::to_string(extremes[0]) + "); set PYCOMM_CHUNK_BYTES alike on every rank");
  }
}
}  // namespace

std::unique_ptr<Hierarchy> BuildHierarchy(const CollectiveContext& ctx) {
  Transport& world = ctx.transport;
  const int P = world.size(), r = world.rank();
  std::vector<std::vector<int>> members;  // per node, its ranks in ascending order
  for (int q = 0; q < P; ++q) {
    const int n = world.node_of(q);
    if (n >= static_cast<int>(members.size())) members.resize(n + 1);
    members[n].push_back(q);
  }
  if (members.size() < 2) return nullptr;  // one node: nothing to build, on every rank alike
  CheckSameChunk(ctx);
  const std::vector<int>& mine = members[world.node_of(r)];

  auto h = std::make_unique<Hierarchy>();
  h->node_ranks = mine;
  h->local_size = static_cast<int>(mine.size());
  h->local_rank = static_cast<int>(std::find(mine.begin(), mine.end(), r) - mine.begin());
  for (const auto& node : members) h->slices = std::max(h->slices, static_cast<int>(node.size()));
  for (int s = h->local_rank; s < h->slices; s += h->local_size) h->owned.push_back(s);
  h->piece_bytes = ctx.chunk_bytes * static_cast<size_t>(h->slices);

  bool ok = true;
  if (h->local_size > 1) {
    h->node = world.Subgroup(mine, kNodeGroupTag);
    ok = h->node && h->node->arena();
    if (ok) {
      h->staging_stride = Hierarchy::kStagingBuffers * h->piece_bytes;
      h->staging_mapping = h->node->MapShared(h->staging_stride * h->local_size);
      h->staging = static_cast<char*>(h->staging_mapping.get());
      ok = h->staging != nullptr;
    }
  }
  // Slice s joins its owner on each node. Every rank creates its groups in ascending s, so a
  // group's members never wait on each other in a cycle.
  h->across.resize(h->slices);

  for (int s : h->owned) {
    std::vector<int> group;
    for (const auto& node : members) group.push_back(node[s % node.size()]);
    std::sort(group.begin(), group.end());
    h->across[s] = world.Subgroup(group, kSliceGroupTag + s);
    ok = ok && h->across[s];
  }
  if (!AllRanks(ctx, ok)) return nullptr;
  return h;
}

}  // namespace pycomm
