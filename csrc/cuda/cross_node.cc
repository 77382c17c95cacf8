#include "cuda/cross_node.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/event_request.h"
#include "transport/shared_arena.h"
#include "transport/wait.h"

namespace pycomm::cuda {

namespace {

// Big enough that a piece's ring is not dominated by per-message costs, small enough that the
// copies of the next piece overlap most of the ring.
constexpr size_t kPieceBytes = 4 << 20;

}  // namespace

CrossNode::CrossNode(Transport& leaders, size_t chunk_bytes, double timeout_s, bool through_mpi, uint64_t* arena_seq,
                     Algorithm algorithm)
    : leaders_(leaders),
      chunk_bytes_(std::max(chunk_bytes, kMinChunkBytes)),
      timeout_s_(timeout_s),
      through_mpi_(through_mpi),
      ring_scratch_(kPipelineDepth * chunk_bytes_),
      arena_seq_(arena_seq && leaders.arena() ? arena_seq : &own_arena_seq_),
      algorithm_(algorithm) {
  constexpr unsigned kFlags = cudaEventDisableTiming;
  int device = 0, max_pitch = 0;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  Check(cudaDeviceGetAttribute(&max_pitch, cudaDevAttrMaxPitch, device), "cudaDeviceGetAttribute(max pitch)");
  max_pitch_ = static_cast<size_t>(max_pitch);
  try {
    for (cudaEvent_t& event : copied_) Check(cudaEventCreateWithFlags(&event, kFlags), "cudaEventCreateWithFlags");
    Check(cudaEventCreateWithFlags(&pinned_free_, kFlags), "cudaEventCreateWithFlags");
  } catch (...) {
    DestroyEvents();  // no destructor runs after a constructor that throws
    throw;
  }
}

CrossNode::~CrossNode() { DestroyEvents(); }

void CrossNode::DestroyEvents() {
  for (cudaEvent_t event : copied_) {
    if (event) cudaEventDestroy(event);
  }
  if (pinned_free_) cudaEventDestroy(pinned_free_);
}

CollectiveContext CrossNode::Context() {
  return CollectiveContext{leaders_, chunk_bytes_, timeout_s_, ring_scratch_.data(), arena_seq_, 0};
}

bool CrossNode::MaySingleCopy() const {
  return OnOneNodeArena() && (algorithm_ == Algorithm::kAuto || algorithm_ == Algorithm::kSingleCopy) &&
         single_copy_.status != SingleCopyState::kUnavailable;
}

void CrossNode::HostAllreduce(void* data, size_t count, DataType dtype, ReduceOp op) {
  const CollectiveContext ctx = Context();
  if (OnOneNodeArena()) {
    // Until the first single-copy call has probed (then the same on every rank), as if it works.
    auto one_shot = [&] {
      return OneShotTakes(algorithm_, count * DataTypeSize(dtype), nodes(),
                          single_copy_.status != SingleCopyState::kUnavailable);
    };
    if (one_shot()) return AllreduceOneShot(ctx, data, data, count, dtype, op);
    if (MaySingleCopy() && AllreduceSingleCopy(ctx, single_copy_, data, data, count, dtype, op)) return;
    if (one_shot()) return AllreduceOneShot(ctx, data, data, count, dtype, op);  // the probe said no
  }
  AllreduceRing(ctx, data, data, count, dtype, op);
}

void CrossNode::HostReduceScatter(const void* in, void* out, size_t count, DataType dtype, ReduceOp op) {
  const CollectiveContext ctx = Context();
  if (MaySingleCopy() && ReduceScatterSingleCopy(ctx, single_copy_, in, out, count, dtype, op)) return;
  ReduceScatterRing(ctx, in, out, count, dtype, op);
}

void CrossNode::Sync(cudaStream_t stream) {
  Check(cudaEventRecord(copied_[0], stream), "cudaEventRecord");
  EventRequest reached(copied_[0], leaders_.rank());
  Wait(reached, timeout_s_);
}

char* CrossNode::Pinned(size_t bytes, cudaStream_t stream) {
  char* pinned = pinned_.Reserve(bytes);
  Check(cudaStreamWaitEvent(stream, pinned_free_, 0), "cudaStreamWaitEvent(pinned free)");
  return pinned;
}

void CrossNode::AgreeInArena(uint64_t signature, Trouble trouble, const std::function<std::string()>& describe) {
  SharedArena& arena = *leaders_.arena();
  SharedArena::CallInfo mine{};
  mine.kind = SharedArena::kDeviceAgreement;
  mine.count = signature;
  mine.variant = static_cast<int32_t>(trouble);
  // The host step's algorithm too: ranks that take different ones would wait for each other (on
  // one node the hierarchy is the ring).
  mine.op = static_cast<int32_t>(algorithm_ == Algorithm::kHierarchical ? Algorithm::kRing : algorithm_);
  const uint64_t seq = ++*arena_seq_;
  arena.Post(seq, mine);
  try {
    arena.WaitAll(seq, timeout_s_);
  } catch (const PeerError& e) {
    throw PeerError(std::string(e.what()) + ", agreeing on a device call (" + describe() + " here)", e.peer());
  }
  // Every rank's post of this round: a host call posts another kind in its first round, and
  // fails there on seeing this one.
  int64_t worst = kNone;
  bool same = true;
  int other_algorithm = -1;  // a rank that set another host algorithm
  for (int q = 0; q < arena.size(); ++q) {
    const SharedArena::CallInfo theirs = arena.info(q, seq);
    if (theirs.kind != SharedArena::kDeviceAgreement) {
      throw MismatchError("pycomm: rank " + std::to_string(q) + " made another call (on host arrays, say) than this " +
                          "rank's " + describe());
    }
    if (theirs.op != mine.op) other_algorithm = q;
    worst = std::max<int64_t>(worst, theirs.variant);
    same = same && theirs.count == signature;
  }
  // Where some rank failed, that is what every rank tells.
  if (other_algorithm >= 0 && trouble == kNone && worst == kNone) {
    throw MismatchError("pycomm: rank " + std::to_string(other_algorithm) + " set another host algorithm " +
                        "(PYCOMM_ALGO) than this rank: device arrays through the host need the same on every rank");
  }
  Settle(trouble, worst, same, describe);
}

void CrossNode::Settle(Trouble trouble, int64_t worst, bool same, const std::function<std::string()>& describe) const {
  if (trouble != kNone) return;
  // Each leader stands for a node, or for itself alone where there is no CUDA IPC.
  const std::string other = OnOneNodeArena() ? "another rank" : "another node";
  if (worst == kMismatch) throw MismatchError("pycomm: the ranks of " + other + "'s group made different device calls");
  if (worst != kNone) throw CommError("pycomm: the device collective failed on " + other + " (see its error)");
  if (!same) {
    throw MismatchError("pycomm: " + std::string(OnOneNodeArena() ? "ranks" : "nodes") +
                        " made different device calls (" + describe() +
                        (OnOneNodeArena() ? " here)" : " on this node)"));
  }
}

void CrossNode::Agree(uint64_t signature, Trouble trouble, const std::function<std::string()>& describe) {
  // On one node's arena (every rank its own group): one arena round, which also meets a rank in
  // a host call at once.
  if (OnOneNodeArena()) return AgreeInArena(signature, trouble, describe);
  // One max-allreduce tells all three: the worst trouble, and the largest and (through the
  // complement, which reverses the order) the smallest signature, equal only if all agree.
  // On the heap: MPI cannot cancel a collective, and one abandoned after a time-out may still
  // write into its buffer, which is then left allocated.
  auto votes = std::make_unique<int64_t[]>(3);
  votes[0] = trouble;
  votes[1] = static_cast<int64_t>(signature);
  votes[2] = static_cast<int64_t>(~signature);
  try {
    if (auto request = leaders_.IallreduceInPlace(votes.get(), 3, DataType::kInt64, ReduceOp::kMax)) {
      try {
        Wait(*request, timeout_s_);
      } catch (...) {
        votes.release();
        throw;
      }
    } else {
      AllreduceRing(Context(), votes.get(), votes.get(), 3, DataType::kInt64, ReduceOp::kMax);
    }
  } catch (const PeerError& e) {
    // Host calls agree across nodes another way, so a node in one meets this as silence.
    throw PeerError(std::string(e.what()) + ", agreeing on a device call with the other nodes (" + describe() +
                        " here): a node may be gone, or in another call (a host call, say)",
                    e.peer());
  }
  Settle(trouble, votes[0],
         static_cast<uint64_t>(votes[1]) == signature && static_cast<uint64_t>(~votes[2]) == signature, describe);
}

size_t CrossNode::StagingBytes(size_t count, DataType dtype) {
  const size_t es = DataTypeSize(dtype);
  return 2 * std::min(count, std::max<size_t>(1, kPieceBytes / es)) * es;
}

size_t CrossNode::AllreducePinnedBytes(size_t count, DataType dtype) const {
  // MPI has every dtype but float16 and bfloat16 (Transport::IallreduceInPlace).
  if (through_mpi_ && dtype != DataType::kFloat16 && dtype != DataType::kBFloat16) return 0;
  return StagingBytes(count, dtype);
}

void CrossNode::Allreduce(void* data, size_t count, DataType dtype, ReduceOp op, cudaStream_t stream) {
  if (!count || nodes() == 1) return;
  if (op == ReduceOp::kAvg) throw std::logic_error("CrossNode::Allreduce: sum, then divide once");
  if (through_mpi_) {
    Sync(stream);  // MPI reads the buffer outside any stream
    if (auto request = leaders_.IallreduceInPlace(data, count, dtype, op)) {
      Wait(*request, timeout_s_);
      return;
    }
    // MPI has no float16 or bfloat16: those go through the host like the rest (every leader
    // sees the same dtype, so all of them take the same path).
  }
  const size_t es = DataTypeSize(dtype);
  const size_t piece_count = std::min(count, std::max<size_t>(1, kPieceBytes / es));
  const size_t pieces = (count + piece_count - 1) / piece_count;
  char* device = static_cast<char*>(data);
  char* host = Pinned(StagingBytes(count, dtype), stream);
  auto elements = [&](size_t piece) { return std::min(piece_count, count - piece * piece_count); };
  auto buffer = [&](size_t piece) { return host + (piece % 2) * piece_count * es; };
  // Piece i goes to buffer i % 2.
  ThroughHostInPieces(
      pieces, stream,
      [&](size_t piece) {
        Check(cudaMemcpyAsync(buffer(piece), device + piece * piece_count * es, elements(piece) * es,
                              cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync(to host)");
      },
      [&](size_t piece) {
        HostAllreduce(buffer(piece), elements(piece), dtype, op);
        Check(cudaMemcpyAsync(device + piece * piece_count * es, buffer(piece), elements(piece) * es,
                              cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync(to device)");
      });
}

void CrossNode::ThroughHostInPieces(size_t pieces, cudaStream_t stream, const std::function<void(size_t)>& copy_in,
                                    const std::function<void(size_t)>& on_host) {
  // Everything is on one stream, so the copy of piece i + 2 into a buffer runs after the copy of
  // piece i back out of it.
  auto queue_copy_in = [&](size_t piece) {
    copy_in(piece);
    Check(cudaEventRecord(copied_[piece % 2], stream), "cudaEventRecord");
  };
  queue_copy_in(0);
  for (size_t piece = 0; piece < pieces; ++piece) {
    if (piece + 1 < pieces) queue_copy_in(piece + 1);
    EventRequest arrived(copied_[piece % 2], leaders_.rank());
    Wait(arrived, timeout_s_);
    on_host(piece);
  }
  Check(cudaEventRecord(pinned_free_, stream), "cudaEventRecord(pinned free)");
}

size_t CrossNode::ReduceScatterPiece(size_t count, DataType dtype) const {
  return std::min(count, std::max<size_t>(1, kPieceBytes / (DataTypeSize(dtype) * nodes())));
}

size_t CrossNode::ReduceScatterPinnedBytes(size_t count, DataType dtype) const {
  // Two buffers, each a piece of every block and the piece of this leader's result.
  return 2 * (nodes() + 1) * ReduceScatterPiece(count, dtype) * DataTypeSize(dtype);
}

void CrossNode::ReduceScatter(const void* data, void* out, size_t count, DataType dtype, ReduceOp op,
                              cudaStream_t stream) {
  if (!count) return;
  if (op == ReduceOp::kAvg) throw std::logic_error("CrossNode::ReduceScatter: sum, then divide once");
  const size_t es = DataTypeSize(dtype), P = static_cast<size_t>(nodes());
  const size_t piece_count = ReduceScatterPiece(count, dtype);
  const size_t pieces = (count + piece_count - 1) / piece_count;
  char* host = Pinned(ReduceScatterPinnedBytes(count, dtype), stream);
  auto elements = [&](size_t piece) { return std::min(piece_count, count - piece * piece_count); };
  // Buffer i % 2 holds piece i of every block (P * piece_count elements), then its result.
  auto blocks = [&](size_t piece) { return host + (piece % 2) * (P + 1) * piece_count * es; };
  auto result = [&](size_t piece) { return blocks(piece) + P * piece_count * es; };
  const char* device = static_cast<const char*>(data);
  // Strided copies take pitches up to the device's limit (2^31 - 1 bytes on current GPUs); above
  // it, one copy per block.
  auto copy_in = [&](size_t piece) {
    const size_t n = elements(piece);
    const char* from = device + piece * piece_count * es;
    // Row q: elements [piece * piece_count, + n) of block q, packed one after another.
    if (count * es <= max_pitch_) {
      Check(cudaMemcpy2DAsync(blocks(piece), n * es, from, count * es, n * es, P, cudaMemcpyDeviceToHost, stream),
            "cudaMemcpy2DAsync(to host)");
      return;
    }
    for (size_t q = 0; q < P; ++q) {
      Check(cudaMemcpyAsync(blocks(piece) + q * n * es, from + q * count * es, n * es, cudaMemcpyDeviceToHost, stream),
            "cudaMemcpyAsync(to host)");
    }
  };
  ThroughHostInPieces(pieces, stream, copy_in, [&](size_t piece) {
    HostReduceScatter(blocks(piece), result(piece), elements(piece), dtype, op);
    Check(cudaMemcpyAsync(static_cast<char*>(out) + piece * piece_count * es, result(piece), elements(piece) * es,
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(to device)");
  });
}

void CrossNode::Broadcast(void* data, size_t bytes, int root, cudaStream_t stream) {
  if (!bytes || nodes() == 1) return;
  char* host = Pinned(BroadcastPinnedBytes(bytes), stream);
  if (node() == root) {
    Check(cudaMemcpyAsync(host, data, bytes, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync(to host)");
  }
  Sync(stream);  // the root's bytes are in `host`; elsewhere the last call is done with it
  BroadcastChain(Context(), host, bytes, root);
  if (node() != root) {
    Check(cudaMemcpyAsync(data, host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync(to device)");
  }
  Check(cudaEventRecord(pinned_free_, stream), "cudaEventRecord(pinned free)");
}

void CrossNode::Allgather(void* data, size_t block, cudaStream_t stream) {
  if (!block || nodes() == 1) return;
  char* host = Pinned(AllgatherPinnedBytes(block), stream);
  char* device = static_cast<char*>(data);
  char* own = host + static_cast<size_t>(node()) * block;
  Check(cudaMemcpyAsync(own, device + static_cast<size_t>(node()) * block, block, cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(to host)");
  Sync(stream);
  // On one node's arena, every rank reads the others' blocks straight from their memory, where
  // it can (else the ring).
  if (!MaySingleCopy() || !AllgatherSingleCopy(Context(), single_copy_, own, host, block, DataType::kUInt8)) {
    AllgatherRing(Context(), own, host, block, DataType::kUInt8);
  }
  Check(cudaMemcpyAsync(device, host, block * nodes(), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync(to device)");
  Check(cudaEventRecord(pinned_free_, stream), "cudaEventRecord(pinned free)");
}

}  // namespace pycomm::cuda
