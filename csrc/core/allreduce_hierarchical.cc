// Hierarchical allreduce: the data goes in pieces through three stages, pipelined so that the
// slow link between nodes stays busy while the fast memory of each node does its part.
//   1. reduce-scatter on the node: every rank copies its piece into its staging buffer in shared
//      memory; the owner of each slice reduces that slice from every local buffer, in local rank
//      order, into its own buffer;
//   2. across nodes: each slice is allreduced among its owners, one per node, in place (MPI's
//      own MPI_Iallreduce, or a ring over MPI point-to-point);
//   3. allgather on the node: every rank copies each slice from its owner's buffer.
// Piece i+1's stage 1 runs while piece i's slices cross between nodes, and piece i's stage 3
// while piece i+1's cross. Pieces are numbered over all calls, and piece i goes through staging
// buffer i mod 3 (core/hierarchy.h says why that is safe). The first node round also checks that
// all ranks make the same call (core/agreement.h), before any data leaves a node. Every slice is
// reduced in one fixed order and then copied, so all ranks get the same bits.

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "core/agreement.h"
#include "core/blocks.h"
#include "core/collectives.h"
#include "core/hierarchy.h"
#include "reduce/reduce.h"
#include "transport/shared_arena.h"
#include "transport/wait.h"

namespace pycomm {

namespace {

// A request whose every poll also advances `others` (MPI moves a message only while some MPI
// call runs).
class ProgressingRequest : public Request {
 public:
  ProgressingRequest(std::unique_ptr<Request> request, std::vector<std::unique_ptr<Request>>& others)
      : request_(std::move(request)), others_(others) {}
  bool Test() override {
    for (auto& other : others_) other->Test();
    return request_->Test();
  }
  int peer() const override { return request_->peer(); }
  void Sleep(std::chrono::microseconds limit) override { request_->Sleep(limit); }

 private:
  std::unique_ptr<Request> request_;
  std::vector<std::unique_ptr<Request>>& others_;
};

class HierarchicalAllreduce {
 public:
  HierarchicalAllreduce(const CollectiveContext& ctx, Hierarchy& h, InterNode inter, DataType dtype, ReduceOp op)
      : ctx_(ctx),
        h_(h),
        inter_(inter),
        dtype_(dtype),
        op_(op),
        es_(DataTypeSize(dtype)),
        reduce_(GetReduceFn(dtype, op)) {}

  void Run(const char* in, char* out, size_t count) {
    // A small message crosses as one slice, from local rank 0 of each node: one allreduce
    // between nodes instead of one per local rank, whose latencies would add up.
    slices_ = count * es_ <= kOneSliceBytes ? 1 : h_.slices;
    for (int s : h_.owned) {
      if (s < slices_) owned_.push_back(s);
    }
    header_ = CallHeader{ctx_.call,
                         count,
                         static_cast<int32_t>(CallKind::kAllreduce),
                         static_cast<int32_t>(dtype_),
                         static_cast<int32_t>(op_),
                         -1,
                         SharedArena::kHierarchical,
                         inter_ == InterNode::kRing ? 1 : 0};
    const size_t piece = std::max<size_t>(1, h_.piece_bytes / es_);
    const uint64_t pieces = (count + piece - 1) / piece;
    auto begin = [&](uint64_t i) { return i * piece; };
    auto length = [&](uint64_t i) { return std::min(piece, count - i * piece); };
    if (!h_.node) {
      // Alone on this node: every slice is this rank's, and crosses straight from the output.
      AgreeAcrossNodes(h_, ctx_.timeout_s, 0, header_);
      for (uint64_t i = 0; i < pieces; ++i) {
        char* data = out + begin(i) * es_;
        if (in != out) std::memcpy(data, in + begin(i) * es_, length(i) * es_);
        Cross(data, length(i));
        Finish(data, length(i));
      }
      return;
    }
    if (pieces == 0) return Agree(NodeRound(SharedArena::kHierarchical));
    first_ = h_.pieces_staged;
    h_.pieces_staged += pieces;
    ReduceScatter(in + begin(0) * es_, 0, length(0));
    Cross(h_.buffer(h_.local_rank, first_), length(0));
    for (uint64_t i = 0; i < pieces; ++i) {
      if (i + 1 < pieces) ReduceScatter(in + begin(i + 1) * es_, i + 1, length(i + 1));
      Finish(h_.buffer(h_.local_rank, first_ + i), length(i));
      if (i + 1 < pieces) Cross(h_.buffer(h_.local_rank, first_ + i + 1), length(i + 1));
      Allgather(out + begin(i) * es_, i, length(i));
    }
  }

 private:
  // The first node round carries the call; before any data leaves the node, every rank learns
  // whether every rank of every node makes it (MismatchError on all of them otherwise).
  void Agree(uint64_t seq) { AgreeAcrossNodes(h_, ctx_.timeout_s, seq, header_); }

  // Stage 1 for piece `i` of n elements at `in`.
  void ReduceScatter(const char* in, uint64_t i, size_t n) {
    char* mine = h_.buffer(h_.local_rank, first_ + i);
    Copy(mine, in, n * es_);
    const uint64_t seq = NodeRound(SharedArena::kHierarchical);
    if (i == 0) Agree(seq);
    const BlockLayout slices(n, slices_);
    // Through a cache-sized accumulator: this rank's own buffer is one of the inputs, reduced in
    // its place in rank order, and receives the result.
    const size_t step = std::max<size_t>(1, std::min(kCacheBytes, kPipelineDepth * ctx_.chunk_bytes) / es_);
    for (int s : owned_) {
      for (size_t at = slices.offset(s), end = at + slices.length(s); at < end; at += step) {
        const size_t len = std::min(step, end - at);
        char* acc = ctx_.scratch;
        reduce_(h_.buffer(0, first_ + i) + at * es_, h_.buffer(1, first_ + i) + at * es_, acc, len);
        for (int q = 2; q < h_.local_size; ++q) reduce_(acc, h_.buffer(q, first_ + i) + at * es_, acc, len);
        std::memcpy(mine + at * es_, acc, len * es_);
        Progress();
      }
    }
  }

  // Stage 2: starts the allreduce of every owned slice of the piece of n elements at `data`.
  void Cross(char* data, size_t n) {
    const BlockLayout slices(n, slices_);
    for (int s : owned_) {
      char* slice = data + slices.offset(s) * es_;
      const size_t len = slices.length(s);
      Transport& group = *h_.across[s];
      std::unique_ptr<Request> request;
      if (inter_ != InterNode::kRing) request = group.IallreduceInPlace(slice, len, dtype_, op_);
      if (!request) request = StartRingAllreduce(group, slice, len, dtype_, op_);
      in_flight_.push_back(std::move(request));
    }
  }

  // The piece's slices have crossed: finish the average on each.
  void Finish(char* data, size_t n) {
    WaitAll(in_flight_, ctx_.timeout_s);
    in_flight_.clear();
    if (op_ != ReduceOp::kAvg) return;
    const BlockLayout slices(n, slices_);
    for (int s : owned_) ScaleDown(data + slices.offset(s) * es_, slices.length(s), dtype_, ctx_.transport.size());
  }

  // Stage 3 for piece `i` of n elements, into `out`.
  void Allgather(char* out, uint64_t i, size_t n) {
    NodeRound(SharedArena::kHierarchical);
    const BlockLayout slices(n, slices_);
    for (int s = 0; s < slices_; ++s) {
      const size_t at = slices.offset(s) * es_;
      Copy(out + at, h_.buffer(s % h_.local_size, first_ + i) + at, slices.length(s) * es_);
    }
  }

  // memcpy in steps, letting the slices in flight between nodes progress in between (MPI moves
  // a message only while some MPI call runs).
  void Copy(char* dst, const char* src, size_t bytes) {
    for (size_t done = 0; done < bytes; done += kCopyStep) {
      std::memcpy(dst + done, src + done, std::min(kCopyStep, bytes - done));
      Progress();
    }
  }

  void Progress() {
    for (auto& request : in_flight_) request->Test();
  }

  // Every local rank has finished what it did before this round (release / acquire); returns
  // the round's sequence number. While waiting, the slices between nodes keep moving.
  uint64_t NodeRound(uint16_t kind) {
    SharedArena& arena = *h_.node->arena();
    const uint64_t seq = ++h_.node_seq;
    arena.Post(seq, AgreementInfo(header_, kind));
    for (int q = 0; q < arena.size(); ++q) {
      if (q == arena.rank()) continue;
      ProgressingRequest arrival(arena.Arrival(q, seq), in_flight_);
      Wait(arrival, ctx_.timeout_s);
    }
    return seq;
  }

  static constexpr size_t kCacheBytes = size_t{64} << 10;
  static constexpr size_t kOneSliceBytes = size_t{64} << 10;
  static constexpr size_t kCopyStep = size_t{256} << 10;

  const CollectiveContext& ctx_;
  Hierarchy& h_;
  InterNode inter_;
  DataType dtype_;
  ReduceOp op_;
  size_t es_;
  ReduceFn reduce_;
  std::vector<std::unique_ptr<Request>> in_flight_;
  CallHeader header_{};
  uint64_t first_ = 0;      // the number of this call's first piece (Hierarchy::pieces_staged)
  int slices_ = 1;          // this call's slices of each piece
  std::vector<int> owned_;  // those of them this rank owns
};

}  // namespace

void AllreduceHierarchical(const CollectiveContext& ctx, Hierarchy& hierarchy, InterNode inter, const void* send,
                           void* recv, size_t count, DataType dtype, ReduceOp op) {
  HierarchicalAllreduce(ctx, hierarchy, inter, dtype, op)
      .Run(static_cast<const char*>(send), static_cast<char*>(recv), count);
}

}  // namespace pycomm
