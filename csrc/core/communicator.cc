// The communicator: checks each call, then runs its algorithm through the executor so that
// operations complete in the order they were issued.

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/agreement.h"
#include "core/collectives.h"
#include "core/device.h"
#include "core/executor.h"
#include "core/fault.h"
#include "core/hierarchy.h"
#include "pycomm/pycomm.h"
#include "transport/shared_arena.h"
#include "transport/transport.h"
#include "transport/wait.h"

namespace pycomm {

namespace {

std::atomic<bool> any_peer_failed{false};

class CommunicatorImpl : public Communicator {
 public:
  CommunicatorImpl(std::unique_ptr<Transport> transport, const Options& options)
      : transport_(std::move(transport)),
        options_(options),
        rank_(transport_->rank()),
        size_(transport_->size()),
        local_rank_(transport_->local_rank()),
        local_size_(transport_->local_size()) {
    if (options_.chunk_bytes < kMinChunkBytes || options_.chunk_bytes > kMaxChunkBytes) {
      throw std::invalid_argument("pycomm: chunk_bytes must be from " + std::to_string(kMinChunkBytes) + " to " +
                                  std::to_string(kMaxChunkBytes) + " (" + std::to_string(kMaxChunkBytes >> 20) +
                                  " MiB), got " + std::to_string(options_.chunk_bytes));
    }
    if (!(options_.timeout_s > 0)) throw std::invalid_argument("pycomm: timeout must be positive");
    // Not zeroed: its pages take memory only once an algorithm uses them.
    scratch_.reset(new char[kPipelineDepth * options_.chunk_bytes]);
    executor_ = std::make_unique<Executor>(!options_.blocking_only);
    if (static_cast<int>(options_.algorithm) < 0 || static_cast<int>(options_.algorithm) >= kNumAlgorithms) {
      throw std::invalid_argument("pycomm: unknown algorithm code " +
                                  std::to_string(static_cast<int>(options_.algorithm)));
    }
    if (static_cast<int>(options_.inter_node) < 0 || static_cast<int>(options_.inter_node) >= kNumInterNode) {
      throw std::invalid_argument("pycomm: unknown inter-node code " +
                                  std::to_string(static_cast<int>(options_.inter_node)));
    }
    for (int q = 0; q < size_; ++q) multi_node_ = multi_node_ || transport_->node_of(q) != 0;
    Debug("created over %s transport, size %d, chunk %zu bytes, node %d (local rank %d of %d)", transport_->name(),
          size(), options_.chunk_bytes, transport_->node_of(rank_), local_rank_, local_size_);
    if ((options_.algorithm == Algorithm::kOneShot || options_.algorithm == Algorithm::kSingleCopy) &&
        !transport_->arena() && size_ > 1) {
      Debug("algorithm %s needs ranks that share memory; the ring runs instead",
            options_.algorithm == Algorithm::kOneShot ? "oneshot" : "singlecopy");
    }
    if (options_.algorithm == Algorithm::kHierarchical && !multi_node_ && size_ > 1) {
      Debug("algorithm hierarchical needs ranks on several nodes; the ring runs instead");
    }
    // Built now, while creating the communicator is a collective anyway: built inside a first
    // call, its blocking MPI calls would hang on a rank that died or made another call.
    if (multi_node_) {
      hierarchy_ = BuildHierarchy(Context());
      Debug(hierarchy_ ? "hierarchy: %d slices across nodes" : "hierarchy unavailable: the ring runs instead",
            hierarchy_ ? hierarchy_->slices : 0);
    }
  }

  ~CommunicatorImpl() override {
    try {
      Close();
    } catch (...) {
      // Destructors must not throw; Close() reports errors to callers that ask for them.
    }
  }

  // Fixed at creation: still answered after close().
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  const Options& options() const override { return options_; }

  void Allreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op) override {
    CheckOp(dtype, op);
    Trace("allreduce", count, dtype, ReduceOpName(op));
    Execute([=] { DoAllreduce(send, recv, count, dtype, op); });
  }

  std::shared_ptr<Work> AllreduceAsync(const void* send, void* recv, size_t count, DataType dtype,
                                       ReduceOp op) override {
    CheckOp(dtype, op);
    CheckUsable();
    Trace("allreduce_async", count, dtype, ReduceOpName(op));
    return executor_->Submit([=] { Guarded([&] { DoAllreduce(send, recv, count, dtype, op); }); });
  }

  void ReduceScatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op) override {
    CheckOp(dtype, op);
    Trace("reduce_scatter", recv_count, dtype, ReduceOpName(op));
    Execute([=] {
      if (size() == 1) return Copy(send, recv, recv_count * DataTypeSize(dtype));
      // Small calls: one arena round, which also checks the call (as the one-shot allreduce).
      if (UseOneShotForOthers(recv_count * size() * DataTypeSize(dtype))) {
        return ReduceScatterOneShot(Context(current_call_), send, recv, recv_count, dtype, op);
      }
      if (UseSingleCopy() &&
          ReduceScatterSingleCopy(Context(current_call_), single_copy_, send, recv, recv_count, dtype, op)) {
        return;
      }
      Agree(CallKind::kReduceScatter, recv_count, dtype, op);
      ReduceScatterRing(Context(), send, recv, recv_count, dtype, op);
    });
  }

  void Allgather(const void* send, void* recv, size_t send_count, DataType dtype) override {
    DataTypeSize(dtype);  // rejects unknown dtypes
    Trace("allgather", send_count, dtype, "-");
    Execute([=] {
      if (size() > 1 && UseOneShotForOthers(send_count * size() * DataTypeSize(dtype))) {
        return AllgatherOneShot(Context(current_call_), send, recv, send_count, dtype);
      }
      if (size() > 1 && UseSingleCopy() &&
          AllgatherSingleCopy(Context(current_call_), single_copy_, send, recv, send_count, dtype)) {
        return;
      }
      if (size() > 1) Agree(CallKind::kAllgather, send_count, dtype);
      AllgatherRing(Context(), send, recv, send_count, dtype);
    });
  }

  void Broadcast(void* buf, size_t count, DataType dtype, int root) override {
    CheckRoot(root);
    const size_t bytes = count * DataTypeSize(dtype);
    Trace("broadcast", count, dtype, ("root " + std::to_string(root)).c_str());
    Execute([=] {
      if (size() == 1) return;
      if (UseOneShotForOthers(bytes, true)) return BroadcastOneShot(Context(current_call_), buf, count, dtype, root);
      if (UseSingleCopy() && BroadcastSingleCopy(Context(current_call_), single_copy_, buf, count, dtype, root)) {
        return;
      }
      Agree(CallKind::kBroadcast, count, dtype, std::nullopt, root);
      if (bytes) BroadcastChain(Context(), buf, bytes, root);
    });
  }

  std::shared_ptr<void> AllocateShared(size_t bytes, void** data) override {
    Trace("allocate_shared", bytes, DataType::kUInt8, "-");
    std::shared_ptr<void> mapping;
    *data = nullptr;
    Execute([&] {
      SharedArena* arena = transport_->arena();
      if (!arena) return;  // the ranks do not all share this node: no segment, on every rank
      // A timed round first: ranks that ask for different sizes all get MismatchError, and a rank
      // that never comes gives PeerError, before any segment exists.
      const uint64_t seq = ++arena_seq_;
      SharedArena::CallInfo mine{bytes, -1, -1, 0, 0, SharedArena::kAllocate, 0};
      mine.call = current_call_;
      arena->Post(seq, mine);
      arena->WaitAll(seq, options_.timeout_s);
      CheckCallsAgree(*arena, seq, mine);
      constexpr size_t kPage = 4096;
      const size_t limit = std::numeric_limits<size_t>::max() / 2 / static_cast<size_t>(size());
      if (bytes > limit) return;  // no segment that large (the same answer on every rank)
      const size_t stride = std::max<size_t>(kPage, (bytes + kPage - 1) / kPage * kPage);
      mapping = transport_->MapShared(stride * size());
      if (!mapping) return;
      // Expired entries go first: their ids are never reused, so a stale id cannot match.
      shared_.erase(
          std::remove_if(shared_.begin(), shared_.end(), [](const Registered& b) { return b.alive.expired(); }),
          shared_.end());
      char* base = static_cast<char*>(mapping.get());
      shared_.push_back(Registered{base, stride, ++last_shared_id_, mapping});
      *data = base + static_cast<size_t>(rank()) * stride;
    });
    return mapping;
  }

  void Barrier() override {
    Trace("barrier", 0, DataType::kUInt8, "-");
    // The agreement round is itself a dissemination barrier: no rank leaves before all entered.
    Execute([=] { Agree(CallKind::kBarrier, 0, std::nullopt); });
  }

  void AllreduceDevice(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op, int device,
                       void* stream) override {
    CheckOp(dtype, op);
    CheckDevice(device, send);
    Trace("allreduce(device)", count, dtype, ReduceOpName(op));
    Execute([=] { Device(device).Allreduce(send, recv, count, dtype, op, stream); });
  }

  void ReduceScatterDevice(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op, int device,
                           void* stream) override {
    CheckOp(dtype, op);
    CheckDevice(device, send);
    Trace("reduce_scatter(device)", recv_count, dtype, ReduceOpName(op));
    Execute([=] { Device(device).ReduceScatter(send, recv, recv_count, dtype, op, stream); });
  }

  void AllgatherDevice(const void* send, void* recv, size_t send_count, DataType dtype, int device,
                       void* stream) override {
    DataTypeSize(dtype);  // rejects unknown dtypes
    CheckDevice(device, send);
    Trace("allgather(device)", send_count, dtype, "-");
    Execute([=] { Device(device).Allgather(send, recv, send_count, dtype, stream); });
  }

  void BroadcastDevice(void* buf, size_t count, DataType dtype, int root, int device, void* stream) override {
    CheckRoot(root);
    CheckDevice(device, buf);
    Trace("broadcast(device)", count, dtype, ("root " + std::to_string(root)).c_str());
    Execute([=] { Device(device).Broadcast(buf, count, dtype, root, stream); });
  }

  void Close() override {
    closed_ = true;  // new calls fail fast; the executor refuses those already past this check
    executor_->Close([this] {
      if (device_) {
        try {
          device_->Quiesce();
          device_.reset();  // it talks through the transport
        } catch (const std::exception& e) {
          // Peers gone or timed out: GPU work queued here may wait forever for theirs, and
          // freeing GPU memory waits for the GPU, so the GPU state is left to the end of the
          // process (which ends with MPI_Abort where a peer failed) instead of hanging here.
          Debug("closing: %s; GPU resources left to the end of the process", e.what());
          (void)device_.release();
        }
      }
      hierarchy_.reset();
      transport_.reset();
    });
  }

 private:
  void CheckOp(DataType dtype, ReduceOp op) const {
    DataTypeSize(dtype);  // rejects unknown dtypes
    if (static_cast<int>(op) < 0 || static_cast<int>(op) >= kNumReduceOps) {
      throw std::invalid_argument("pycomm: unknown reduce op " + std::to_string(static_cast<int>(op)));
    }
    if (op == ReduceOp::kAvg && !IsFloatingPoint(dtype)) {
      throw std::invalid_argument(std::string("pycomm: avg is not defined for integer dtype ") + DataTypeName(dtype));
    }
  }

  void CheckRoot(int root) const {
    if (root < 0 || root >= size()) {
      throw std::invalid_argument("pycomm: broadcast root " + std::to_string(root) + " is not a rank of a size-" +
                                  std::to_string(size()) + " communicator");
    }
  }

  // A bad argument, checked before anything is sent: the communicator stays usable. A negative
  // `device` (the array did not say) is asked of the driver for `ptr`.
  void CheckDevice(int& device, const void* ptr) const {
    const int bound = device_id_.load();
    // An empty array with no pointer could be anywhere: it goes where this communicator's do.
    if (device < 0) device = !ptr && bound >= 0 ? bound : DeviceOfPointer(ptr);
    if (bound >= 0 && bound != device) {
      throw std::invalid_argument("pycomm: this communicator's device arrays live on GPU " + std::to_string(bound) +
                                  ", not GPU " + std::to_string(device));
    }
  }

  // The device collectives start with the first device call (collective, like every call) and
  // stay bound to that GPU.
  DeviceCollectives& Device(int device) {
    if (!device_) {
      device_ = CreateDeviceCollectives(*transport_, &arena_seq_, GetHierarchy(), device, options_);
      device_id_ = device;
      Debug("device collectives on GPU %d, GPU work ordered on the %s, node work: %s", device, device_->sync_name(),
            device_->work_name());
    }
    return *device_;
  }

  // At issue time: a closed communicator takes no new work.
  void CheckUsable() const {
    if (closed_) throw CommError("pycomm: the communicator is closed");
    CheckNotBroken();
  }

  // At run time: work issued before close() still runs (close drains the queue), but nothing
  // runs after a failure.
  void CheckNotBroken() const {
    if (broken_) throw CommError("pycomm: the communicator is unusable after an earlier error: " + broken_reason_);
  }

  // A failure inside a collective leaves peers at unknown points of the protocol: from then on
  // the communicator refuses work rather than mis-matching messages.
  void Guarded(const std::function<void()>& fn) {
    CheckNotBroken();
    // Numbered as they run, not as they were issued: threads that race to issue calls on one
    // communicator still number them in the order the ranks pair them.
    current_call_ = ++calls_run_;
    try {
      fn();
    } catch (const std::exception&) {
      std::exception_ptr error = std::current_exception();
      // This rank posts nothing more: peers that wait for it hear so at once, not at their timeout.
      if (SharedArena* arena = transport_->arena()) arena->Leave();
      if (hierarchy_ && hierarchy_->node && hierarchy_->node->arena()) hierarchy_->node->arena()->Leave();
      // MPI forbids cancelling an abandoned MPI_Iallreduce, which may still write into the
      // staging segment: that memory (and the groups' communicators) stays for the process's life.
      if (hierarchy_) hierarchy_.release();
      // A dead peer seen as MPI's or a memory read's failure is named as such, and makes the
      // process end with MPI_Abort (MPI_Finalize would wait for the dead rank forever).
      error = BlameDeadPeer(error, *transport_);
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        broken_reason_ = e.what();
        if (dynamic_cast<const PeerError*>(&e)) any_peer_failed = true;
      }
      broken_ = true;
      std::rethrow_exception(error);
    }
  }

  void Execute(const std::function<void()>& fn) {
    CheckUsable();
    executor_->Run([&] { Guarded(fn); });
  }

  void DoAllreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op) {
    const size_t bytes = count * DataTypeSize(dtype);
    if (size() == 1) return Copy(send, recv, bytes);
    // The one-shot, shared-buffer and single-copy paths check the call through the arena.
    if (UseOneShot(bytes)) return AllreduceOneShot(Context(current_call_), send, recv, count, dtype, op);
    // Above the one-shot's range, where the ranks share memory, data in a shared buffer is
    // reduced in place without copies; the ranks first agree that all of them can. Without any
    // shared buffer (comm.empty is collective: the same answer on every rank) that round is skipped.
    bool agreed = false;
    if (transport_->arena() && options_.algorithm == Algorithm::kAuto && last_shared_id_ != 0) {
      if (AllreduceInSharedBuffer(Context(current_call_), Placement(recv, bytes), send == recv, count, dtype, op)) {
        Debug("allreduce in place in a shared buffer: no copies");
        return;
      }
      agreed = true;
    }
    if (UseHierarchical() && GetHierarchy()) {
      // Checks the call itself, in its first round.
      return AllreduceHierarchical(Context(current_call_), *hierarchy_, options_.inter_node, send, recv, count, dtype,
                                   op);
    }
    // Ordinary buffers: peers read each other's memory directly, where every rank can.
    if (UseSingleCopy()) {
      if (AllreduceSingleCopy(Context(current_call_), single_copy_, send, recv, count, dtype, op)) {
        Debug("single-copy allreduce: read peers' buffers directly");
        return;
      }
      Debug("single-copy allreduce unavailable (process_vm_readv refused): the ring runs instead");
    }
    if (!agreed) Agree(CallKind::kAllreduce, count, dtype, op);
    AllreduceRing(Context(), send, recv, count, dtype, op);
  }

  // Across nodes the hierarchy, at every size: the cost model in docs/algorithms.md puts it ahead on
  // a cluster (on one machine simulating nodes the flat ring wins at 0.5-8 MiB: a "network" as fast
  // as memory).
  bool UseHierarchical() const {
    return multi_node_ && (options_.algorithm == Algorithm::kAuto || options_.algorithm == Algorithm::kHierarchical);
  }

  // Null where the ranks share one node, or where the hierarchy could not be set up (on every
  // rank alike): the ring and the flat agreement take its place.
  Hierarchy* GetHierarchy() { return hierarchy_.get(); }

  // Before any data moves over the transport: every rank must be making this same call.
  void Agree(CallKind kind, size_t count, std::optional<DataType> dtype, std::optional<ReduceOp> op = std::nullopt,
             int root = -1) {
    const CallHeader header{current_call_,
                            count,
                            static_cast<int32_t>(kind),
                            dtype ? static_cast<int32_t>(*dtype) : -1,
                            op ? static_cast<int32_t>(*op) : -1,
                            root};
    // Across nodes, through the hierarchy.
    if (GetHierarchy()) return CheckHeadersAgree(Context(current_call_), *hierarchy_, header);
    CheckHeadersAgree(Context(current_call_), header);
  }

  // Where `data` lies in a live shared buffer of this rank, if it does.
  SharedPlacement Placement(const void* data, size_t bytes) const {
    const char* p = static_cast<const char*>(data);
    for (const Registered& b : shared_) {
      const char* mine = b.base + static_cast<size_t>(rank()) * b.stride;
      if (p >= mine && p + bytes <= mine + b.stride && !b.alive.expired()) {
        return SharedPlacement{b.id, b.base, b.stride, static_cast<size_t>(p - mine)};
      }
    }
    return SharedPlacement{};
  }

  // One-shot for small messages where all ranks share a node.
  bool UseOneShot(size_t bytes) const {
    // Until the first single-copy call has probed (then the same on every rank), as if it works.
    return transport_->arena() &&
           OneShotTakes(options_.algorithm, bytes, size(), single_copy_.status != SingleCopyState::kUnavailable);
  }

  // The same for reduce-scatter, allgather and `broadcast`.
  bool UseOneShotForOthers(size_t bytes, bool broadcast = false) const {
    return transport_->arena() && OneShotTakesOthers(options_.algorithm, broadcast, bytes, size(),
                                                     single_copy_.status != SingleCopyState::kUnavailable);
  }

  // Single-copy (auto or forced) where all ranks share a node: for allreduce above the
  // one-shot's range (UseOneShot said no), for reduce-scatter and allgather at any size.
  bool UseSingleCopy() const {
    return transport_->arena() &&
           (options_.algorithm == Algorithm::kSingleCopy || options_.algorithm == Algorithm::kAuto);
  }

  static void Copy(const void* src, void* dst, size_t bytes) {
    if (bytes && src != dst) std::memcpy(dst, src, bytes);
  }

  CollectiveContext Context(uint64_t call = 0) {
    return CollectiveContext{*transport_, options_.chunk_bytes, options_.timeout_s, scratch_.get(), &arena_seq_, call};
  }

  // Numbers each call in issue order (the number PYCOMM_FAULT and the debug lines use; equal to
  // MismatchError's unless threads race to issue calls) and writes its debug line:
  // "r1 | allreduce #3 float32 x 10 sum".
  void Trace(const char* what, size_t count, DataType dtype, const char* detail) {
    uint64_t seq = ++calls_;
    Debug("%s #%llu %s x %zu %s", what, static_cast<unsigned long long>(seq), DataTypeName(dtype), count, detail);
    fault_.At(rank_, seq);
  }

  template <typename... Args>
  void Debug(const char* fmt, Args... args) const {
    if (!options_.debug) return;
    std::fprintf(stderr, "r%d | ", rank_);
    std::fprintf(stderr, fmt, args...);
    std::fputc('\n', stderr);
  }

  std::unique_ptr<Transport> transport_;
  Options options_;
  const int rank_, size_, local_rank_, local_size_;
  std::unique_ptr<char[]> scratch_;  // kPipelineDepth chunks
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<DeviceCollectives> device_;
  bool multi_node_ = false;               // the ranks span several nodes (fixed at creation)
  std::unique_ptr<Hierarchy> hierarchy_;  // only touched inside the executor (after construction)
  std::atomic<int> device_id_{-1};        // device_'s GPU, readable outside the executor
  std::atomic<uint64_t> calls_{0};
  const FaultPlan fault_ = FaultPlan::FromEnvironment();
  uint64_t arena_seq_ = 0;                     // only touched inside the executor
  uint64_t calls_run_ = 0, current_call_ = 0;  // likewise: the running call's number (MismatchError's #N)
  // Shared buffers handed out by AllocateShared (only touched inside the executor).
  struct Registered {
    char* base;
    size_t stride;
    uint32_t id;
    std::weak_ptr<void> alive;
  };
  std::vector<Registered> shared_;
  uint32_t last_shared_id_ = 0;
  SingleCopyState single_copy_;  // only touched inside the executor
  std::atomic<bool> closed_{false};
  std::atomic<bool> broken_{false};
  std::string broken_reason_;
};

}  // namespace

bool Communicator::AnyPeerFailed() { return any_peer_failed; }

std::unique_ptr<Communicator> Communicator::FromTransport(std::unique_ptr<Transport> transport,
                                                          const Options& options) {
  return std::make_unique<CommunicatorImpl>(std::move(transport), options);
}

}  // namespace pycomm
