// Ring reduce-scatter, allgather and allreduce.
//
// The data is cut into `size` blocks. In the reduce-scatter phase each rank passes a running
// partial sum of one block to its right neighbour at each of size-1 steps; after the last step
// rank r holds the full reduction of block r. The allgather phase then passes finished blocks
// around the ring for another size-1 steps. Each rank sends and receives 2(P-1)/P of the data,
// the bandwidth optimum. Every block is reduced in one fixed order along the ring and then
// copied, so all ranks end with bitwise identical results.
//
// Each block is split into chunks of ctx.chunk_bytes, and RunPipeline keeps several chunks in
// flight, so that receiving, reducing and sending overlap. StartRingAllreduce runs the same steps
// without blocking, one whole block per step, for callers that pipeline pieces themselves (the
// hierarchical allreduce's slices between nodes).

#include <algorithm>
#include <cstring>
#include <memory>

#include "core/blocks.h"
#include "core/collectives.h"
#include "core/pipeline.h"
#include "reduce/reduce.h"

namespace pycomm {

namespace {

// Where unit u of a ring phase falls: its step, and the element range of its chunk in a block.
class ChunkPlan {
 public:
  ChunkPlan(const BlockLayout& layout, size_t chunk_elems)
      : layout_(layout), chunk_elems_(chunk_elems), chunks_((layout.max_length() + chunk_elems - 1) / chunk_elems) {}
  size_t chunks_per_block() const { return chunks_; }
  int step(size_t unit) const { return static_cast<int>(unit / chunks_); }
  // First element of unit's chunk inside `block`, relative to the whole buffer.
  size_t begin(size_t unit, int block) const { return layout_.offset(block) + (unit % chunks_) * chunk_elems_; }
  // Elements in unit's chunk of `block`; 0 past the end of a shorter block.
  size_t length(size_t unit, int block) const {
    size_t start = (unit % chunks_) * chunk_elems_;
    size_t len = layout_.length(block);
    return start < len ? std::min(chunk_elems_, len - start) : 0;
  }

 private:
  const BlockLayout& layout_;
  size_t chunk_elems_;
  size_t chunks_;
};

size_t ChunkElems(const CollectiveContext& ctx, size_t elem_size) { return ctx.chunk_bytes / elem_size; }

// Reduce-scatter phase. Partial sums of other blocks go to `work` (same layout as `input`; may be
// `input` itself for an in-place allreduce); the finished block of this rank goes to `own`.
void ReduceScatterPhase(const CollectiveContext& ctx, const BlockLayout& layout, const char* input, char* work,
                        char* own, DataType dtype, ReduceOp op) {
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const size_t es = DataTypeSize(dtype);
  const size_t chunk_bytes = ChunkElems(ctx, es) * es;
  const ChunkPlan plan(layout, ChunkElems(ctx, es));
  const ReduceFn reduce = GetReduceFn(dtype, op);
  // At step s rank r sends block r-s-1 and reduces block r-s-2 into its copy, so that the block
  // reduced at the last step (s = P-2) is block r.
  auto send_block = [&](int s) { return Mod(r - s - 1, P); };
  auto recv_block = [&](int s) { return Mod(r - s - 2, P); };
  auto slot = [&](size_t u) { return ctx.scratch + (u % kPipelineDepth) * chunk_bytes; };

  auto send_of = [&](size_t u) {
    int s = plan.step(u), b = send_block(s);
    const char* base = s == 0 ? input : work;
    return Span{const_cast<char*>(base) + plan.begin(u, b) * es, plan.length(u, b) * es};
  };
  auto recv_of = [&](size_t u) {
    int b = recv_block(plan.step(u));
    return Span{slot(u), plan.length(u, b) * es};
  };
  auto consume = [&](size_t u) {
    int s = plan.step(u), b = recv_block(s);
    size_t begin = plan.begin(u, b);
    char* dst = s == P - 2 ? own + (begin - layout.offset(b)) * es : work + begin * es;
    reduce(input + begin * es, slot(u), dst, plan.length(u, b));
  };
  RunPipeline(ctx, Mod(r - 1, P), Mod(r + 1, P), (P - 1) * plan.chunks_per_block(), send_of, recv_of, consume);
}

// Allgather phase: this rank's finished block is at `own`; every other block lands in `out`.
void AllgatherPhase(const CollectiveContext& ctx, const BlockLayout& layout, const char* own, char* out, size_t es) {
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const ChunkPlan plan(layout, ChunkElems(ctx, es));
  auto send_block = [&](int s) { return Mod(r - s, P); };
  auto recv_block = [&](int s) { return Mod(r - s - 1, P); };

  auto send_of = [&](size_t u) {
    int s = plan.step(u), b = send_block(s);
    size_t begin = plan.begin(u, b);
    const char* src = s == 0 ? own + (begin - layout.offset(b)) * es : out + begin * es;
    return Span{const_cast<char*>(src), plan.length(u, b) * es};
  };
  auto recv_of = [&](size_t u) {
    int b = recv_block(plan.step(u));
    return Span{out + plan.begin(u, b) * es, plan.length(u, b) * es};
  };
  RunPipeline(ctx, Mod(r - 1, P), Mod(r + 1, P), (P - 1) * plan.chunks_per_block(), send_of, recv_of, [](size_t) {});
}

// The non-blocking ring (StartRingAllreduce): one block per step, no chunks (the caller passes
// pipeline pieces already).
class RingStepper : public Request {
 public:
  RingStepper(Transport& group, char* data, size_t count, DataType dtype, ReduceOp op)
      : group_(group),
        data_(data),
        es_(DataTypeSize(dtype)),
        layout_(count, group.size()),
        reduce_(GetReduceFn(dtype, op)),
        received_(new char[layout_.max_length() * es_]) {
    Start();
  }

  bool Test() override {
    while (step_ < Steps()) {
      if (!send_->Test() || !recv_->Test()) return false;
      if (step_ < size() - 1) {
        const int b = Mod(rank() - step_ - 2, size());
        reduce_(Block(b), received_.get(), Block(b), layout_.length(b));
      }
      ++step_;
      Start();
    }
    return true;
  }
  // Named as the transport names it (a rank of the whole communicator for a subgroup).
  int peer() const override { return recv_->peer(); }

 private:
  int rank() const { return group_.rank(); }
  int size() const { return group_.size(); }
  int Steps() const { return 2 * (size() - 1); }
  char* Block(int b) const { return data_ + layout_.offset(b) * es_; }

  // Reduce-scatter step s sends block r-s-1 and receives block r-s-2 to reduce; allgather step
  // s sends block r-s (finished) and receives block r-s-1 in place.
  void Start() {
    if (step_ >= Steps()) return;
    const int r = rank(), P = size();
    const bool scatter = step_ < P - 1;
    const int s = scatter ? step_ : step_ - (P - 1);
    const int out = Mod(scatter ? r - s - 1 : r - s, P), in = Mod(scatter ? r - s - 2 : r - s - 1, P);
    recv_ = group_.Irecv(Mod(r - 1, P), scatter ? received_.get() : Block(in), layout_.length(in) * es_);
    send_ = group_.Isend(Mod(r + 1, P), Block(out), layout_.length(out) * es_);
  }

  Transport& group_;
  char* data_;
  size_t es_;
  BlockLayout layout_;
  ReduceFn reduce_;
  std::unique_ptr<char[]> received_;
  int step_ = 0;
  std::unique_ptr<Request> send_, recv_;
};

}  // namespace

std::unique_ptr<Request> StartRingAllreduce(Transport& group, void* data, size_t count, DataType dtype, ReduceOp op) {
  return std::make_unique<RingStepper>(group, static_cast<char*>(data), count, dtype, op);
}

void AllreduceRing(const CollectiveContext& ctx, const void* send, void* recv, size_t count, DataType dtype,
                   ReduceOp op) {
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const size_t es = DataTypeSize(dtype);
  const BlockLayout layout(count, P);
  char* out = static_cast<char*>(recv);
  char* own = out + layout.offset(r) * es;
  // Out of place, every block of `out` except this rank's own is written by the reduce-scatter's
  // reductions or the allgather's receives, and the own block by the last reduction: the input
  // is never copied.
  ReduceScatterPhase(ctx, layout, static_cast<const char*>(send), out, own, dtype, op);
  if (op == ReduceOp::kAvg) ScaleDown(own, layout.length(r), dtype, P);
  AllgatherPhase(ctx, layout, own, out, es);
}

void ReduceScatterRing(const CollectiveContext& ctx, const void* send, void* recv, size_t recv_count, DataType dtype,
                       ReduceOp op) {
  const int P = ctx.transport.size();
  const size_t es = DataTypeSize(dtype);
  const BlockLayout layout(recv_count * P, P);
  // Partial sums of the other blocks need somewhere to live until they are sent on; the input
  // stays untouched. Left uninitialised: every byte read is written first.
  std::unique_ptr<char[]> work(P > 2 ? new char[recv_count * P * es] : nullptr);
  ReduceScatterPhase(ctx, layout, static_cast<const char*>(send), work.get(), static_cast<char*>(recv), dtype, op);
  if (op == ReduceOp::kAvg) ScaleDown(recv, recv_count, dtype, P);
}

void AllgatherRing(const CollectiveContext& ctx, const void* send, void* recv, size_t send_count, DataType dtype) {
  const int P = ctx.transport.size(), r = ctx.transport.rank();
  const size_t es = DataTypeSize(dtype);
  const BlockLayout layout(send_count * P, P);
  char* out = static_cast<char*>(recv);
  char* own = out + layout.offset(r) * es;
  if (send_count && own != send) std::memcpy(own, send, send_count * es);
  AllgatherPhase(ctx, layout, own, out, es);
}

}  // namespace pycomm
