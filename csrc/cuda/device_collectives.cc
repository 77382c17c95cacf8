// Device collectives. Inside a node each call hands every rank's buffers to a DeviceGroup: its
// leader does the node's part in one pass over GPU memory, or, where every rank has a GPU of its
// own, each rank does its own part (see device_group.h for why and how the ranks are ordered).
// Across nodes the leaders combine their nodes' parts through CrossNode, and each leader then
// writes the result into every buffer of its node; split, each slice's owners do so for their
// slice of an allreduce, over the hierarchy's slice groups.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/device.h"
#include "core/hierarchy.h"
#include "cuda/cross_node.h"
#include "cuda/cuda_check.h"
#include "cuda/device_group.h"
#include "cuda/driver.h"
#include "cuda/reduce_kernels.h"
#include "cuda/scratch.h"
#include "transport/loopback.h"

namespace pycomm {

bool BuiltWithCuda() { return true; }

int DeviceOfPointer(const void* ptr) {
  if (!ptr) {  // an empty array's (__cuda_array_interface__ gives 0): it lives nowhere, so here
    int device = 0;
    cuda::Check(cudaGetDevice(&device), "cudaGetDevice");
    return device;
  }
  cudaPointerAttributes attributes{};
  cuda::Check(cudaPointerGetAttributes(&attributes, ptr), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument("pycomm: the array's pointer is not GPU memory");
  }
  return attributes.device;
}

std::shared_ptr<void> UseDevice(int device) { return std::make_shared<cuda::DeviceGuard>(device); }

void OrderAfterStream(const void* ptr, void* stream, void* producer) {
  cuda::DeviceGuard guard(DeviceOfPointer(ptr));
  cudaEvent_t event = nullptr;
  cuda::Check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t err = cudaEventRecord(event, static_cast<cudaStream_t>(producer));
  if (err == cudaSuccess) err = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), event, 0);
  cudaEventDestroy(event);  // its resources go once the wait is met
  cuda::Check(err, "ordering the work after the array's stream");
}

namespace {

char* At(void* base, size_t offset) { return static_cast<char*>(base) + offset; }

// The setting `name` as one of `choices` (its name, its value); the first is the default, taken
// also where the setting is empty.
template <typename T>
T Choice(const char* name, const std::vector<std::pair<std::string, T>>& choices) {
  const char* set = std::getenv(name);
  const std::string value = set ? set : "";
  if (value.empty()) return choices[0].second;
  std::string names;  // "a, b or c"
  for (size_t i = 0; i < choices.size(); ++i) {
    if (value == choices[i].first) return choices[i].second;
    names += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i].first;
  }
  throw std::invalid_argument(std::string("pycomm: ") + name + " must be " + names + ", got " + value);
}

// PYCOMM_GPU_SYNC=auto|host|stream chooses how ranks order their GPU work (see DeviceSync).
// auto (the default) is host where ranks share a GPU: measured on an H200 shared by 2 ranks,
// stream waits across processes cost a context switch (~140 us) per rank and call, host sync
// 35 us per call in all (bench/results/2026-11-27-h200-gpu.md); and stream, NCCL's semantics,
// where each rank has a GPU of its own.
cuda::DeviceSync SyncFromEnvironment() {
  using S = cuda::DeviceSync;
  return Choice<S>("PYCOMM_GPU_SYNC", {{"auto", S::kAuto}, {"stream", S::kStream}, {"host", S::kHost}});
}

// PYCOMM_GPU_WORK=auto|leader|split chooses who does a node's work (see DeviceWork). auto (the
// default) splits it where every rank, on every node, has a GPU of its own and orders by streams.
cuda::DeviceWork WorkFromEnvironment() {
  using W = cuda::DeviceWork;
  return Choice<W>("PYCOMM_GPU_WORK", {{"auto", W::kAuto}, {"leader", W::kLeader}, {"split", W::kSplit}});
}

// PYCOMM_GPU_INTER_NODE: `mpi` needs a CUDA-aware MPI, `host` always stages through pinned host
// memory, `auto` takes MPI when every node's MPI reports CUDA support.
enum class CrossNodePath { kAuto, kMpi, kHost };

CrossNodePath CrossNodeFromEnvironment() {
  using C = CrossNodePath;
  return Choice<C>("PYCOMM_GPU_INTER_NODE", {{"auto", C::kAuto}, {"mpi", C::kMpi}, {"host", C::kHost}});
}

// PYCOMM_GPU_IPC=auto|off: `auto` reads peers' GPU memory through CUDA IPC inside a node where
// every rank can open what it needs of its peers', else goes through the host; `off` always
// goes through the host.
bool IpcFromEnvironment() { return Choice<bool>("PYCOMM_GPU_IPC", {{"auto", true}, {"off", false}}); }

// The communicator's ranks by node: nodes[n] lists node n's ranks in ascending order, and
// nodes[n][0] is its leader. `rank_per_node`: every rank as if alone on a node of its own.
struct NodeLayout {
  explicit NodeLayout(const Transport& world, bool rank_per_node = false) : node_of(world.size()) {
    for (int r = 0; r < world.size(); ++r) {
      node_of[r] = rank_per_node ? r : world.node_of(r);
      if (node_of[r] >= static_cast<int>(nodes.size())) nodes.resize(node_of[r] + 1);
      nodes[node_of[r]].push_back(r);
    }
    node = node_of[world.rank()];
    for (const auto& members : nodes) widest = std::max(widest, members.size());
  }
  int local_index(int rank) const {
    const auto& members = nodes[node_of[rank]];
    return static_cast<int>(std::find(members.begin(), members.end(), rank) - members.begin());
  }

  std::vector<int> node_of;
  std::vector<std::vector<int>> nodes;
  int node = 0;
  size_t widest = 0;  // the most ranks on one node
};

// Elements [first, last) of `count` that part `part` of a split allreduce reduces: equal slices
// of whole 256-byte granules (the kernels' 16-byte loads stay aligned), at least kMinSliceBytes
// each, so that a small call goes to the first ranks only instead of a launch on every GPU for a
// few bytes each. Untuned: no multi-GPU node has measured it yet.
struct Slice {
  size_t first, last;
};
constexpr size_t kMinSliceBytes = size_t{32} << 10;

Slice SliceOf(size_t count, size_t element_bytes, cuda::WorkPart part) {
  if (part.parts == 1) return {0, count};
  const size_t granule = std::max<size_t>(1, 256 / element_bytes);
  size_t slice = std::max((count + part.parts - 1) / part.parts, kMinSliceBytes / element_bytes);
  slice = (slice + granule - 1) / granule * granule;
  const size_t first = std::min(count, part.index * slice);
  return {first, std::min(count, first + slice)};
}

class GroupCollectives : public DeviceCollectives {
 public:
  // `node` is the transport among this node's ranks (the whole communicator on one node), and
  // `node_arena_seq` counts the rounds made through its arena.
  GroupCollectives(const Transport& world, NodeLayout layout, Transport& node, uint64_t* node_arena_seq, int device,
                   double timeout_s, cuda::DeviceSync sync, cuda::DeviceWork work)
      : world_size_(world.size()),
        rank_(world.rank()),
        layout_(std::move(layout)),
        group_(node, node_arena_seq, device, timeout_s, sync, work) {}
  ~GroupCollectives() override {
    // Every member frees on this GPU, whatever the tearing-down thread had current (none would
    // make device 0's context); the caller's comes back when teardown_guard_, the first member,
    // goes last. Where the GPU cannot be made current, they free from the caller's context.
    std::exception_ptr unused;
    teardown_guard_.emplace(device(), &unused);
    if (scratch_free_) cudaEventDestroy(scratch_free_);
  }

  bool splits() const { return group_.work() == cuda::DeviceWork::kSplit; }
  bool ipc() const { return group_.ipc(); }
  // Every rank is a group of its own, joined to the others through the host (ThroughHost).
  void MarkThroughHost() { through_host_ = true; }

  // On a node's leader, when the communicator spans several nodes: `leaders` (one rank per
  // node, in node order) outlives this.
  // `arena_seq`, `algorithm`: see CrossNode.
  void ConnectNodes(Transport& leaders, size_t chunk_bytes, double timeout_s, bool through_mpi,
                    uint64_t* arena_seq = nullptr, Algorithm algorithm = Algorithm::kAuto) {
    cuda::DeviceGuard guard(group_.device());  // the events below belong to this rank's GPU
    across_ = std::make_unique<cuda::CrossNode>(leaders, chunk_bytes, timeout_s, through_mpi, arena_seq, algorithm);
    leader_links_ = {{0, across_.get()}};
    cuda::Check(cudaEventCreateWithFlags(&scratch_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }

  // With split work across nodes, on every rank (after ConnectNodes on the leader): the link to
  // the owners of each slice this rank owns (the hierarchy's groups, which outlive this).
  void ConnectSlices(const Hierarchy& hierarchy, size_t chunk_bytes, double timeout_s, bool through_mpi) {
    cuda::DeviceGuard guard(group_.device());
    slices_ = hierarchy.slices;
    if (slices_ < 1 || hierarchy.owned.empty()) throw std::logic_error("pycomm: no slices for split device work");
    for (int slice : hierarchy.owned) {
      if (!hierarchy.across[slice] || (slice == 0 && !across_)) {
        throw std::logic_error("pycomm: no group of the owners of slice " + std::to_string(slice));
      }
      if (slice == 0) {  // the owners of slice 0 are the leaders
        slice_links_.emplace_back(0, across_.get());
        continue;
      }
      own_links_.push_back(
          std::make_unique<cuda::CrossNode>(*hierarchy.across[slice], chunk_bytes, timeout_s, through_mpi));
      slice_links_.emplace_back(slice, own_links_.back().get());
    }
  }

  // Collective: the leader's protocol from now on (some node's group could not split).
  void LeaveWorkToLeader() {
    group_.LeaveWorkToLeader();
    slice_links_.clear();
    own_links_.clear();
  }

  // A rank alone on its node hands its buffers to itself: a group of one over this.
  void Own(std::unique_ptr<Transport> transport) { own_transport_ = std::move(transport); }

  int device() const override { return group_.device(); }
  const char* sync_name() const override { return cuda::DeviceSyncName(group_.sync()); }
  const char* work_name() const override {
    return through_host_ ? "every rank's through the host (no CUDA IPC between ranks)"
                         : cuda::DeviceWorkName(group_.work());
  }

  void Quiesce() override { group_.Quiesce(); }

  void Allreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op, void* stream) override {
    const size_t bytes = count * DataTypeSize(dtype);
    // In place the two refs name the same memory; they stay two so that every rank passes the
    // same number of buffers.
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), bytes, true, false}, {recv, bytes, false, true}};
    const cuda::DeviceCall call{cuda::DeviceCall::kAllreduce, static_cast<int32_t>(dtype), static_cast<int32_t>(op), -1,
                                count};
    group_.Run(
        call, buffers, Stream(stream),
        [&](const std::vector<std::vector<void*>>& ptrs, cuda::WorkPart part, cudaStream_t s) {
          const size_t es = DataTypeSize(dtype);
          auto at = [&](Slice slice, std::vector<const void*>* inputs, std::vector<void*>* outputs) {
            for (const auto& rank : ptrs) {
              inputs->push_back(At(rank[0], slice.first * es));
              outputs->push_back(At(rank[1], slice.first * es));
            }
          };
          if (!MultiNode()) {
            // Split, each rank reduces its slice of every input into that slice of every output.
            const Slice slice = SliceOf(count, es, part);
            if (slice.first == slice.last) return;
            std::vector<const void*> inputs;
            std::vector<void*> outputs;
            at(slice, &inputs, &outputs);
            // Passes beyond one (over 8 ranks) accumulate in the first output: this rank's own.
            std::swap(outputs[0], outputs[part.index]);
            Reduce(inputs, outputs, slice.last - slice.first, dtype, op, s);
            return;
          }
          // Each slice of the node's sum lands in its owner's output (the leader owns them all
          // unless split), is combined across nodes there with that slice's owners, and is then
          // copied (for kAvg: divided) into every output of the node.
          const ReduceOp partial = Partial(op);
          const auto& links = Links(part);
          for (const auto& [index, link] : links) {
            const Slice slice = part.split ? SliceOf(count, es, cuda::WorkPart{index, slices_}) : Slice{0, count};
            const size_t n = slice.last - slice.first;
            if (!n) continue;
            std::vector<const void*> inputs;
            std::vector<void*> outputs;
            at(slice, &inputs, &outputs);
            void* mine = outputs[part.index];
            if (inputs.size() > 1 || inputs[0] != mine) Reduce(inputs, {mine}, n, dtype, partial, s);
            link->Allreduce(mine, n, dtype, partial, s);
            if (outputs.size() > 1 || op == ReduceOp::kAvg) Reduce({mine}, outputs, n, dtype, op, s);
          }
        },
        AcrossNodes(call, 0, [=](const cuda::CrossNode& link, int slice, bool split) {
          const Slice part =
              split ? SliceOf(count, DataTypeSize(dtype), cuda::WorkPart{slice, slices_}) : Slice{0, count};
          return link.AllreducePinnedBytes(part.last - part.first, dtype);
        }));
  }

  void ReduceScatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                     void* stream) override {
    const size_t block = recv_count * DataTypeSize(dtype);
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), block * world_size_, true, false},
                                            {recv, block, false, true}};
    const cuda::DeviceCall call{cuda::DeviceCall::kReduceScatter, static_cast<int32_t>(dtype), static_cast<int32_t>(op),
                                -1, recv_count};
    group_.Run(
        call, buffers, Stream(stream),
        [&](const std::vector<std::vector<void*>>& ptrs, cuda::WorkPart part, cudaStream_t s) {
          if (!recv_count) return;
          std::vector<const void*> inputs;
          for (const auto& rank : ptrs) inputs.push_back(rank[0]);
          if (!MultiNode()) {
            for (size_t owner = 0; owner < ptrs.size(); ++owner) {
              if (!part.owns(owner)) continue;  // split: each rank reduces its own block
              std::vector<const void*> blocks;
              for (const void* input : inputs) blocks.push_back(static_cast<const char*>(input) + owner * block);
              Reduce(blocks, {ptrs[owner][1]}, recv_count, dtype, op, s);
            }
            return;
          }
          // Across nodes the whole reduction crosses (the leaders' ring is an allreduce), and each
          // rank of the node takes its block of it. The leader does it all, split or not.
          if (!part.owns(0)) return;
          const ReduceOp partial = Partial(op);
          if (LeadersReduceScatter()) {
            // One rank a node: the leaders' reduce-scatter is the communicator's.
            across_->ReduceScatter(inputs[0], ptrs[0][1], recv_count, dtype, partial, s);
            if (op == ReduceOp::kAvg) Reduce({ptrs[0][1]}, {ptrs[0][1]}, recv_count, dtype, op, s);  // divides
            return;
          }
          char* sum = Scratch(block * world_size_, s);
          Reduce(inputs, {sum}, recv_count * world_size_, dtype, partial, s);
          across_->Allreduce(sum, recv_count * world_size_, dtype, partial, s);
          for (size_t local = 0; local < ptrs.size(); ++local) {
            const int owner = layout_.nodes[layout_.node][local];
            Reduce({sum + owner * block}, {ptrs[local][1]}, recv_count, dtype, op, s);
          }
          ReleaseScratch(s);
        },
        AcrossNodes(call, LeadersReduceScatter() ? 0 : block * world_size_,
                    [this, recv_count, dtype](const cuda::CrossNode& link, int slice, bool) {
                      if (slice != 0) return size_t{0};
                      return LeadersReduceScatter() ? link.ReduceScatterPinnedBytes(recv_count, dtype)
                                                    : link.AllreducePinnedBytes(recv_count * world_size_, dtype);
                    }));
  }

  void Allgather(const void* send, void* recv, size_t send_count, DataType dtype, void* stream) override {
    const size_t block = send_count * DataTypeSize(dtype);
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), block, true, false},
                                            {recv, block * world_size_, false, true}};
    const cuda::DeviceCall call{cuda::DeviceCall::kAllgather, static_cast<int32_t>(dtype), -1, -1, send_count};
    group_.Run(
        call, buffers, Stream(stream),
        [&](const std::vector<std::vector<void*>>& ptrs, cuda::WorkPart part, cudaStream_t s) {
          if (!block) return;
          const auto& mine = layout_.nodes[layout_.node];
          if (!MultiNode()) {
            // Split, each rank writes its own block into every output.
            for (size_t from = 0; from < ptrs.size(); ++from) {
              if (!part.owns(from)) continue;
              std::vector<void*> places;
              for (const auto& to : ptrs) places.push_back(At(to[1], from * block));
              CopyToAll(ptrs[from][0], places, block, s);
            }
            return;
          }
          // Node n's blocks travel together: slot n of `all` holds its ranks' blocks in local order,
          // padded to the widest node. The leader does it all, split or not.
          if (!part.owns(0)) return;
          const size_t slot = layout_.widest * block;
          char* all = Scratch(slot * layout_.nodes.size(), s);
          for (size_t local = 0; local < mine.size(); ++local) {
            Copy(all + layout_.node * slot + local * block, ptrs[local][0], block, s);
          }
          across_->Allgather(all, slot, s);
          char* leader_out = static_cast<char*>(ptrs[0][1]);
          for (size_t n = 0; n < layout_.nodes.size(); ++n) {
            for (size_t local = 0; local < layout_.nodes[n].size(); ++local) {
              Copy(leader_out + layout_.nodes[n][local] * block, all + n * slot + local * block, block, s);
            }
          }
          for (size_t local = 1; local < ptrs.size(); ++local) Copy(ptrs[local][1], leader_out, block * world_size_, s);
          ReleaseScratch(s);
        },
        AcrossNodes(call, layout_.widest * block * layout_.nodes.size(),
                    [slot = layout_.widest * block](const cuda::CrossNode& link, int slice, bool) {
                      return slice == 0 ? link.AllgatherPinnedBytes(slot) : 0;
                    }));
  }

  void Broadcast(void* buf, size_t count, DataType dtype, int root, void* stream) override {
    const size_t bytes = count * DataTypeSize(dtype);
    const bool is_root = rank_ == root;
    std::vector<cuda::BufferRef> buffers = {{buf, bytes, is_root, !is_root}};
    const cuda::DeviceCall call{cuda::DeviceCall::kBroadcast, static_cast<int32_t>(dtype), -1, root, count};
    group_.Run(
        call, buffers, Stream(stream),
        [&](const std::vector<std::vector<void*>>& ptrs, cuda::WorkPart part, cudaStream_t s) {
          if (!bytes) return;
          const bool root_here = layout_.node_of[root] == layout_.node;
          const int root_local = root_here ? layout_.local_index(root) : 0;
          if (MultiNode()) {
            // The root's bytes reach this node's leader, then every other buffer of the node. The
            // leader does it all, split or not.
            if (!part.owns(0)) return;
            Copy(ptrs[0][0], ptrs[root_local][0], bytes, s);
            across_->Broadcast(ptrs[0][0], bytes, layout_.node_of[root], s);
            part = cuda::WorkPart{};
          }
          // Split on one node, each rank reads the root's bytes into its own buffer.
          std::vector<void*> to;
          for (size_t local = 0; local < ptrs.size(); ++local) {
            if (part.owns(local)) to.push_back(ptrs[local][0]);
          }
          CopyToAll(ptrs[root_local][0], to, bytes, s);
        },
        AcrossNodes(call, 0, [=](const cuda::CrossNode& link, int slice, bool) {
          return slice == 0 ? link.BroadcastPinnedBytes(bytes) : 0;
        }));
  }

 private:
  static cudaStream_t Stream(void* stream) { return static_cast<cudaStream_t>(stream); }

  bool MultiNode() const { return layout_.nodes.size() > 1; }

  // Whether a reduce_scatter across nodes is the leaders' own reduce-scatter through the host:
  // with one rank a node (every rank alone, or no CUDA IPC), where node n is rank n (nodes are
  // numbered by their lowest rank). Through a CUDA-aware MPI the whole vector is allreduced.
  bool LeadersReduceScatter() const { return MultiNode() && across_ && layout_.widest == 1 && !across_->through_mpi(); }

  // The links over which this rank's part of a call crosses between nodes, with the slice each
  // carries: the leaders' (the leader's protocol), or one per slice this rank owns (split).
  using LinkList = std::vector<std::pair<int, cuda::CrossNode*>>;
  const LinkList& Links(cuda::WorkPart part) const { return part.split ? slice_links_ : leader_links_; }

  // Across nodes, each call is agreed on over every link before its data crosses
  // (DeviceGroup::Run), the memory it needs reserved first, so that a failure to get it is agreed
  // on too. `pinned(link, slice, split)`: the pinned memory the call needs on that link.
  // Split, every link agrees, the slice owners of every call (the leaders' own included): each
  // agreement over a link that carries nothing in this call still tells the others whether this
  // node can go on, so that none waits for a node that has failed. Every rank of a node tells
  // every link the same, so every link reaches the same verdict.
  using PinnedBytes = std::function<size_t(const cuda::CrossNode& link, int slice, bool split)>;
  cuda::CrossNodeAgreement AcrossNodes(const cuda::DeviceCall& call, size_t scratch_bytes, PinnedBytes pinned) {
    if (!MultiNode()) return {};
    cuda::CrossNodeAgreement across;
    across.prepare = [this, scratch_bytes, pinned](cuda::WorkPart part) {
      for (const auto& [slice, link] : Links(part)) {
        if (scratch_bytes && slice == 0) scratch_.Reserve(scratch_bytes);
        link->ReservePinned(pinned(*link, slice, part.split));
      }
    };
    across.agree = [this, call](int trouble, cuda::WorkPart part) {
      std::exception_ptr first;
      for (const auto& [slice, link] : Links(part)) {
        try {
          link->Agree(call.Signature(), static_cast<cuda::CrossNode::Trouble>(trouble),
                      [&call] { return call.Describe(); });
        } catch (...) {
          if (!first) first = std::current_exception();  // the others still hear this node
        }
      }
      if (first) std::rethrow_exception(first);
    };
    return across;
  }
  // The op each partial result is combined with: an average is a sum until the last step.
  static ReduceOp Partial(ReduceOp op) { return op == ReduceOp::kAvg ? ReduceOp::kSum : op; }

  static void Copy(void* to, const void* from, size_t bytes, cudaStream_t s) {
    if (to == from) return;
    cuda::Check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
  }

  // `bytes` from `from` to each of `to` (`from` itself skipped): one launch per
  // kMaxReduceOutputs places instead of a copy each, as a one-input uint8 sum, which copies bits.
  // The kernel's 16-byte loads need every pointer 16-byte aligned (else it goes byte by byte):
  // otherwise, copies.
  void CopyToAll(const void* from, const std::vector<void*>& to, size_t bytes, cudaStream_t s) {
    std::vector<void*> places;
    bool aligned = reinterpret_cast<uintptr_t>(from) % 16 == 0;
    for (void* place : to) {
      if (place == from) continue;
      places.push_back(place);
      aligned = aligned && reinterpret_cast<uintptr_t>(place) % 16 == 0;
    }
    if (places.size() == 1 || !aligned) {
      for (void* place : places) Copy(place, from, bytes, s);
      return;
    }
    for (size_t first = 0; first < places.size(); first += cuda::kMaxReduceOutputs) {
      const size_t last = std::min(places.size(), first + cuda::kMaxReduceOutputs);
      Launch({from}, std::vector<void*>(places.begin() + first, places.begin() + last), bytes, DataType::kUInt8,
             ReduceOp::kSum, s);
    }
  }

  // This rank's device scratch for this call; ReleaseScratch marks where this call is done with it.
  char* Scratch(size_t bytes, cudaStream_t s) {
    if (!scratch_free_) {  // made at set-up on leaders of several nodes; elsewhere at first use (Reduce)
      cuda::Check(cudaEventCreateWithFlags(&scratch_free_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    }
    char* scratch = scratch_.Reserve(bytes);
    cuda::Check(cudaStreamWaitEvent(s, scratch_free_, 0), "cudaStreamWaitEvent(scratch free)");
    return scratch;
  }
  void ReleaseScratch(cudaStream_t s) {
    cuda::Check(cudaEventRecord(scratch_free_, s), "cudaEventRecord(scratch free)");
  }

  // One fused pass reads at most kMaxReduceInputs buffers and writes at most kMaxReduceOutputs.
  // With more ranks on a node the reduction runs in several passes that accumulate in
  // outputs[0] (rounded to the dtype between passes), which is then copied to the other outputs.
  // Every rank still gets the same bits: one pass writes them all.
  void Reduce(const std::vector<const void*>& inputs, const std::vector<void*>& outputs, size_t count, DataType dtype,
              ReduceOp op, cudaStream_t s) {
    constexpr size_t kIn = cuda::kMaxReduceInputs, kOut = cuda::kMaxReduceOutputs;
    if (inputs.size() <= kIn && outputs.size() <= kOut) {
      Launch(inputs, outputs, count, dtype, op, s);
      return;
    }
    const ReduceOp partial = Partial(op);
    void* acc = outputs[0];
    // In place, acc may be an input that a later pass reads: the passes before the last then
    // accumulate in scratch, and only the last writes acc. The inputs keep their order, so the
    // bits are those of the same call out of place.
    size_t next = std::min(inputs.size(), kIn);
    const bool read_late = std::find(inputs.begin() + next, inputs.end(), acc) != inputs.end();
    void* sum = read_late ? Scratch(count * DataTypeSize(dtype), s) : acc;
    if (next > 1 || inputs[0] != sum) {
      Launch(std::vector<const void*>(inputs.begin(), inputs.begin() + next), {sum}, count, dtype, partial, s);
    }
    while (next < inputs.size()) {
      const size_t take = std::min(inputs.size() - next, kIn - 1);
      std::vector<const void*> group = {sum};
      group.insert(group.end(), inputs.begin() + next, inputs.begin() + next + take);
      next += take;
      Launch(group, {next == inputs.size() ? acc : sum}, count, dtype, partial, s);
    }
    if (read_late) ReleaseScratch(s);
    if (outputs.size() == 1 && op == partial) return;
    // The first group includes acc itself, so a kAvg divides once and later groups copy.
    for (size_t first = 0; first < outputs.size(); first += kOut) {
      const size_t last = std::min(outputs.size(), first + kOut);
      Launch({acc}, std::vector<void*>(outputs.begin() + first, outputs.begin() + last), count, dtype,
             first ? partial : op, s);
    }
  }

  void Launch(const std::vector<const void*>& inputs, const std::vector<void*>& outputs, size_t count, DataType dtype,
              ReduceOp op, cudaStream_t s) {
    cuda::Check(cuda::LaunchReduce(inputs.data(), static_cast<int>(inputs.size()), outputs.data(),
                                   static_cast<int>(outputs.size()), count, dtype, op, world_size_, s),
                "reduction kernel launch");
  }

  std::optional<cuda::DeviceGuard> teardown_guard_;  // first: destroyed after every other member
  int world_size_;
  int rank_;
  NodeLayout layout_;
  std::unique_ptr<Transport> own_transport_;  // group_'s, for a rank alone on its node (set by Own)
  cuda::DeviceGroup group_;
  std::unique_ptr<cuda::CrossNode> across_;  // on a leader when there are several nodes
  LinkList leader_links_ = {{0, nullptr}};   // the leader's protocol: across_ carries the whole call
  // Split across nodes: the slices' count (the most ranks on a node), and this rank's slices with
  // their links (slice 0's is across_); own_links_ holds the others.
  int slices_ = 0;
  LinkList slice_links_;
  std::vector<std::unique_ptr<cuda::CrossNode>> own_links_;
  cuda::Scratch scratch_{cuda::Memory::kDevice};
  cudaEvent_t scratch_free_ = nullptr;
  bool through_host_ = false;
};

// Every rank learns whether all of them could do a step of the set-up, so that none goes on to
// wait for one that could not: the minimum of each of `votes` over the communicator (timed, like
// every wait).
void Vote(Transport& transport, double timeout_s, std::vector<int32_t>* votes) {
  constexpr size_t kChunk = 64;
  std::vector<char> scratch(kPipelineDepth * kChunk);
  uint64_t unused_arena_seq = 0;
  AllreduceRing(CollectiveContext{transport, kChunk, timeout_s, scratch.data(), &unused_arena_seq, 0}, votes->data(),
                votes->data(), votes->size(), DataType::kInt32, ReduceOp::kMin);
}

void RaiseIfAnyFailed(const std::exception_ptr& mine, int32_t all_ok) {
  if (mine) std::rethrow_exception(mine);
  if (!all_ok) throw CommError("pycomm: setting up the device collectives failed on another rank (see its error)");
}

// The groups of ranks that read each other's GPU memory through CUDA IPC: one per node (the
// hierarchy's node group; a group of one for a rank alone on its node), joined across nodes by
// their leaders, or split, by every slice's owners.
std::unique_ptr<GroupCollectives> WithIpc(Transport& transport, NodeLayout layout, uint64_t* arena_seq,
                                          Hierarchy* hierarchy, bool leader, int device, size_t chunk_bytes,
                                          double timeout_s, cuda::DeviceSync sync, cuda::DeviceWork work,
                                          bool through_mpi) {
  if (layout.nodes.size() == 1) {
    return std::make_unique<GroupCollectives>(transport, std::move(layout), transport, arena_seq, device, timeout_s,
                                              sync, work);
  }
  std::unique_ptr<Transport> alone;
  if (!hierarchy->node) alone = std::move(CreateLoopbackTransports(1)[0]);
  Transport& node = hierarchy->node ? *hierarchy->node : *alone;
  uint64_t* node_seq = hierarchy->node ? &hierarchy->node_seq : nullptr;
  auto collectives =
      std::make_unique<GroupCollectives>(transport, std::move(layout), node, node_seq, device, timeout_s, sync, work);
  if (alone) collectives->Own(std::move(alone));
  if (!collectives->ipc()) return collectives;  // unused: every rank goes through the host
  if (leader) collectives->ConnectNodes(*hierarchy->across[0], chunk_bytes, timeout_s, through_mpi);
  if (collectives->splits()) collectives->ConnectSlices(*hierarchy, chunk_bytes, timeout_s, through_mpi);
  return collectives;
}

// Where ranks cannot reach each other's GPU memory: every rank hands its buffers to itself (a
// group of one), and the groups combine their parts through pinned host memory over the
// communicator's own transport, as nodes do without a CUDA-aware MPI; on one node with the
// node's shared-memory algorithms (`arena_seq` counts the communicator's arena rounds), as
// options.algorithm picks them for host arrays.
std::unique_ptr<GroupCollectives> ThroughHost(Transport& transport, uint64_t* arena_seq, int device,
                                              const Options& options, cuda::DeviceSync sync) {
  std::unique_ptr<Transport> alone = std::move(CreateLoopbackTransports(1)[0]);
  auto collectives = std::make_unique<GroupCollectives>(transport, NodeLayout(transport, true), *alone, nullptr, device,
                                                        options.timeout_s, sync, cuda::DeviceWork::kLeader);
  collectives->Own(std::move(alone));
  collectives->MarkThroughHost();
  if (transport.size() > 1) {
    collectives->ConnectNodes(transport, options.chunk_bytes, options.timeout_s, false, arena_seq, options.algorithm);
  }
  return collectives;
}

}  // namespace

std::unique_ptr<DeviceCollectives> CreateDeviceCollectives(Transport& transport, uint64_t* arena_seq,
                                                           Hierarchy* hierarchy, int device, const Options& options) {
  const size_t chunk_bytes = options.chunk_bytes;
  const double timeout_s = options.timeout_s;
  NodeLayout layout(transport);
  const bool leader = layout.nodes[layout.node][0] == transport.rank();
  // 1. Settings and what the ranks can do, before any exchange. Votes: all ok; every leader's
  //    MPI can move GPU memory (and may); nobody forces MPI; every rank may use CUDA IPC.
  std::exception_ptr failure;
  cuda::DeviceSync sync = cuda::DeviceSync::kAuto;
  cuda::DeviceWork work = cuda::DeviceWork::kAuto;
  std::vector<int32_t> votes = {1, 1, 1, 1};
  try {
    sync = SyncFromEnvironment();
    work = WorkFromEnvironment();
    votes[3] = IpcFromEnvironment();
    const CrossNodePath path = CrossNodeFromEnvironment();
    // A rank alone has nothing to split.
    if (transport.size() == 1 && work == cuda::DeviceWork::kAuto) work = cuda::DeviceWork::kLeader;
    if (layout.nodes.size() > 1) {
      // The IPC groups are the hierarchy's; where it could not be set up (on every rank alike;
      // PYCOMM_DEBUG=1 says why), every rank goes through the host, which needs none.
      if (!hierarchy) {
        votes[3] = 0;
      } else if (leader && !hierarchy->across[0]) {
        throw std::logic_error("pycomm: no group of the nodes' leaders");
      }
      votes[1] = path != CrossNodePath::kHost && transport.accepts_device_memory();
      votes[2] = path != CrossNodePath::kMpi;
    }
  } catch (...) {
    failure = std::current_exception();
    votes[0] = 0;
  }
  Vote(transport, timeout_s, &votes);
  RaiseIfAnyFailed(failure, votes[0]);
  const bool through_mpi = votes[1] == 1;
  if (!votes[2] && !through_mpi) {
    throw CommError(
        "pycomm: PYCOMM_GPU_INTER_NODE=mpi, but this MPI does not report CUDA support on every node "
        "(MPIX_Query_cuda_support), or some rank set host; use auto or host, alike on every rank");
  }
  // 2. The groups (the hierarchy's, built with the communicator: no MPI call here that could block
  //    without a time-out; a rank alone on its node gets a group of one) and their GPU events.
  //    Across nodes, work is split only where every node's group splits it (built[1] below).
  //    Where some rank cannot open its peers' events or memory through CUDA IPC (built[2]), or
  //    PYCOMM_GPU_IPC=off on some rank, every rank goes through the host instead (3).
  std::unique_ptr<GroupCollectives> collectives;
  if (votes[3]) {
    try {
      collectives = WithIpc(transport, std::move(layout), arena_seq, hierarchy, leader, device, chunk_bytes, timeout_s,
                            sync, work, through_mpi);
    } catch (...) {
      failure = std::current_exception();
    }
    std::vector<int32_t> built = {failure ? 0 : 1, collectives && collectives->splits() ? 1 : 0,
                                  collectives && collectives->ipc() ? 1 : 0};
    Vote(transport, timeout_s, &built);
    RaiseIfAnyFailed(failure, built[0]);
    if (built[2]) {
      if (!built[1] && collectives->splits()) collectives->LeaveWorkToLeader();
      return collectives;
    }
    try {
      collectives->Quiesce();  // collective: peers close what they opened of this rank's first
      collectives.reset();
    } catch (...) {
      failure = std::current_exception();
      (void)collectives.release();  // its GPU state stays to the end of the process, as after close() fails
    }
  }
  // 3. Through the host (every rank votes below, even one whose step 2 failed, so that none waits
  //    for it).
  try {
    if (!failure) collectives = ThroughHost(transport, arena_seq, device, options, sync);
  } catch (...) {
    failure = std::current_exception();
  }
  std::vector<int32_t> built = {failure ? 0 : 1};
  Vote(transport, timeout_s, &built);
  RaiseIfAnyFailed(failure, built[0]);
  return collectives;
}

}  // namespace pycomm
