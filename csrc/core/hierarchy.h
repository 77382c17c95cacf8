// The groups that the hierarchical allreduce runs over: this rank's node, and for each slice of
// the data that this rank owns, that slice's owner on every node.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/collectives.h"
#include "transport/transport.h"

namespace pycomm {

struct Hierarchy {
  // Every piece of the data is cut into `slices` slices (the most ranks any node has); on a node
  // of L ranks, local rank l owns the slices s with s % L == l.
  int slices = 0;
  int local_rank = 0, local_size = 1;
  std::vector<int> node_ranks;  // this node's ranks in the whole communicator, by local rank
  std::vector<int> owned;
  // This node's ranks, with a shared arena; null when this rank is alone on its node.
  std::unique_ptr<Transport> node;
  uint64_t node_seq = 0;  // rounds made through node->arena()
  // Pieces staged so far, over all calls: piece numbers, and so the staging buffers, carry on
  // from one call to the next, so that a call's first piece does not overwrite the buffer that
  // a slower rank may still be copying the last call's result from.
  uint64_t pieces_staged = 0;
  // Shared staging on the node: local rank q's region is staging + q * staging_stride and holds
  // kStagingBuffers buffers of piece_bytes each.
  std::shared_ptr<void> staging_mapping;
  char* staging = nullptr;
  size_t staging_stride = 0;
  size_t piece_bytes = 0;
  // across[s]: the owners of slice s, one per node (null for slices this rank does not own).
  std::vector<std::unique_ptr<Transport>> across;

  // `piece` counts over all calls (pieces_staged + the piece's index in its call).
  char* buffer(int local, uint64_t piece) const {
    return staging + static_cast<size_t>(local) * staging_stride + (piece % kStagingBuffers) * piece_bytes;
  }
  // A piece's buffer is written again three pieces later, in this call or a later one. The
  // writer has then passed the allgather round of the piece after it, which every rank posts
  // only once it has finished copying that piece's result out.
  static constexpr size_t kStagingBuffers = 3;
};

// Collective over ctx.transport. Null on every rank where the hierarchy cannot run: the ranks
// share one node, the transport cannot make subgroups, or some node's shared memory could not be
// set up. Each piece holds `chunk_bytes` per slice; CommError on every rank if the ranks'
// chunk_bytes differ.
std::unique_ptr<Hierarchy> BuildHierarchy(const CollectiveContext& ctx);

}  // namespace pycomm
