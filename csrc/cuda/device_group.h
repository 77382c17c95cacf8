// Ranks of one node that hand their device buffers to each other for each collective, in one
// of two ways (DeviceWork):
//
// Leader: several ranks may share one GPU, and processes on one GPU do not run kernels
// concurrently, so splitting a collective's work across them gains nothing: one kernel on the
// leader that reads every rank's input once and writes every rank's output once moves the fewest
// bytes through the GPU's memory. Order across processes comes from CUDA IPC events and host
// messages, never from spinning on the device:
//   1. every rank records `ready` on its stream (its input is written), then hands the leader the
//      IPC handles of its buffers (through the node's shared arena where there is one);
//   2. the leader makes its stream wait for every `ready`, enqueues the work, records `done`, and
//      answers every rank;
//   3. every rank makes its stream wait for `done`.
//
// Split: where every rank has a GPU of its own, each does its part of the work (its slice of an
// allreduce, read from every input and written to every output), so that every GPU's copy
// engines and links work at once:
//   1. every rank records `ready` and hands the leader its handles; the leader checks the calls
//      and sends every rank all the handles;
//   2. every rank maps the others' buffers, agrees with other nodes (if any), waits for every
//      `ready`, enqueues its part, records its `done`, and tells the leader whether it could; the
//      leader answers every rank;
//   3. every rank waits for every `done`.
//   The second hand-off also keeps the events safe to reuse: no rank records `ready` or `done`
//   again before every rank has queued its waits for the last records.
//
// No call waits for the GPU (host sync aside): each returns once its stream holds the right
// dependencies, as NCCL's do.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/phase_times.h"
#include "cuda/ipc_memory.h"
#include "cuda/scratch.h"
#include "transport/leader_exchange.h"
#include "transport/transport.h"

namespace pycomm::cuda {

// One buffer of a collective, on the calling rank.
struct BufferRef {
  void* ptr;
  size_t bytes;
  bool read;     // the leader reads it (an input)
  bool written;  // the leader writes it (an output)
};

// What a call is, compared by the leader across ranks: ranks that made different calls get
// MismatchError instead of the leader reading their buffers with its own sizes.
struct DeviceCall {
  enum Kind : int32_t { kAllreduce, kReduceScatter, kAllgather, kBroadcast };
  int32_t kind;
  int32_t dtype;      // DataType
  int32_t op = -1;    // ReduceOp, -1 where none
  int32_t root = -1;  // broadcast
  uint64_t count;     // elements, as the call's own count argument

  bool operator==(const DeviceCall& o) const {
    return kind == o.kind && dtype == o.dtype && op == o.op && root == o.root && count == o.count;
  }
  std::string Describe() const;
  // The same on ranks that make the same call (FNV-1a over the fields).
  uint64_t Signature() const;
};

// Which part of a call's work the calling rank does: all of it on the leader (parts == 1), or
// part `index` of `parts`, one per rank, when the work is split (a group of one splits too:
// across nodes its rank then owns every slice).
struct WorkPart {
  int index = 0;
  int parts = 1;
  bool split = false;
  // For work made of one item per rank (a block, an output): whether this rank does `item`.
  bool owns(size_t item) const { return parts == 1 || static_cast<int>(item) == index; }
};

// One rank's work of a call: buffers[rank][i] is rank's i-th BufferRef, mapped into the calling
// rank's address space.
using GroupWork =
    std::function<void(const std::vector<std::vector<void*>>& buffers, WorkPart part, cudaStream_t stream)>;

// Agreeing with other nodes before a call's data crosses. `prepare` reserves what the part of the
// work needs (and may throw); `agree` is told whether this node can go on (0), failed (1) or made
// mismatched calls (2), the same on every rank of the node that calls it, and may throw to stop
// the call.
struct CrossNodeAgreement {
  std::function<void(WorkPart part)> prepare;
  std::function<void(int trouble, WorkPart part)> agree;
  explicit operator bool() const { return static_cast<bool>(agree); }
};

// How ranks wait for each other's GPU work.
enum class DeviceSync {
  // cudaStreamWaitEvent on the IPC events: no call waits for the GPU, but on a GPU shared by
  // several processes every dependency between their contexts costs a context switch.
  kStream,
  // Peers submit no GPU work of their own: each waits on the host for its stream (its inputs
  // are written) before handing its buffers over, and polls the leader's `done` event before
  // returning. Only the leader's context runs, so there is no context switch, at the price of
  // peers' calls waiting for the GPU (as MPI_Allreduce would).
  kHost,
  // kStream where every rank of the group has a GPU of its own (no context switches: NCCL's
  // semantics for free), kHost where some share one. Decided by the leader at construction.
  kAuto,
};

const char* DeviceSyncName(DeviceSync sync);

// Who does a node's work (see the top of this file).
enum class DeviceWork {
  kLeader,
  kSplit,  // needs kStream: every rank queues work of its own
  // kSplit where every rank of the group has a GPU of its own and sync is kStream, else kLeader
  // (a group of one included: across nodes its rank then owns every slice).
  kAuto,
};

const char* DeviceWorkName(DeviceWork work);

class DeviceGroup {
 public:
  // Collective over `transport`, whose ranks must all be on this node. `device` is this rank's GPU.
  // `arena_seq` counts the rounds of transport.arena() (see LeaderExchange); null: hand-offs go
  // as messages. `sync`, `work`: as asked for on this rank (alike on every rank); kAuto takes
  // the leader's decision.
  DeviceGroup(Transport& transport, uint64_t* arena_seq, int device, double timeout_s, DeviceSync sync,
              DeviceWork work);
  ~DeviceGroup();

  int device() const { return device_; }
  // Whether this rank could open, through CUDA IPC, the events and memory of every rank it
  // waits for or reads from. Where some rank could not, Run must not be called: the group can
  // only Quiesce (CreateDeviceCollectives then goes through the host instead).
  bool ipc() const { return ipc_; }
  DeviceSync sync() const { return sync_; }  // never kAuto
  DeviceWork work() const { return work_; }  // never kAuto

  // Runs one collective: every rank passes the same number of buffers, in the same roles.
  // `work` runs on the leader (WorkPart{0, 1}), or with kSplit on every rank (its own part).
  // A failure on any rank fails the call on every rank, except one after the last hand-off
  // (waiting for the others' work, the stage-out), which is that rank's alone: the others'
  // outputs are complete (another hand-off per call would be the price). A rank whose `call`
  // differs from the leader's gets MismatchError, as does the leader. `agree` (if any) runs
  // before any work, even after a failure, so that other nodes hear of it: on the leader, or with
  // kSplit on every rank.
  void Run(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream, const GroupWork& work,
           const CrossNodeAgreement& agree = {});
  // Collective, between calls: the leader's protocol from now on (where other nodes' groups
  // could not split their work, say).
  // Closes what split work opened that the leader's protocol does not use (a peer that frees its
  // staging later tells the leader alone).
  void LeaveWorkToLeader();
  // Collective, the group's last call: waits until no rank's queued GPU work can still use the
  // group's events or another rank's buffers, and closes what this rank opened of others' before
  // any rank goes on to free its own (CUDA leaves freeing what a peer still has open undefined).
  // Mappings that another group of this process also uses stay theirs: the group's own staging
  // buffers are exported to this group alone.
  void Quiesce();

 private:
  static constexpr int kLeader = 0;

  // `unready`: this rank's failure before the call began (making its GPU current): it still
  // takes part, so that the call fails on every rank instead of the others waiting for it.
  // `imports`: this call's mappings of other ranks' buffers. `clock`: this call's phases
  // (PhaseClock), lapped as it goes.
  void RunLeader(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                 const GroupWork& work, const CrossNodeAgreement& agree, const std::exception_ptr& unready,
                 IpcImporter::Imports& imports, PhaseClock& clock);
  void RunSplit(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                const GroupWork& work, const CrossNodeAgreement& agree, const std::exception_ptr& unready,
                IpcImporter::Imports& imports, PhaseClock& clock);
  // Returns where other ranks can reach buffers[i], staging buffers that cannot be exported
  // (staged_at[i]: where in staging_; SIZE_MAX: not staged).
  void Describe(const std::vector<BufferRef>& buffers, cudaStream_t stream, std::vector<IpcBuffer>* out,
                std::vector<size_t>* staged_at);
  // A rank's hand-off message (header, then where others reach its buffers), once its inputs are
  // ready: `ready` recorded (stream sync) or its stream synchronised (host sync). Returns this
  // rank's failure (`unready`'s included), if any: the message then says so (status 0) and the
  // call fails everywhere.
  std::exception_ptr Prepare(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream,
                             const std::exception_ptr& unready, std::vector<char>* message,
                             std::vector<size_t>* staged_at, PhaseClock& clock);
  // After the call's work: copies staged outputs back to the caller's buffers.
  void StageOut(const std::vector<BufferRef>& buffers, const std::vector<size_t>& staged_at, cudaStream_t stream);
  // On the leader: throws MismatchError or CommError unless every peer's message (header first)
  // says it made `call`, ordered alike, and could prepare its buffers.
  void CheckCalls(const DeviceCall& call, const std::vector<std::vector<char>>& messages) const;
  // Split work's hand-off: every rank's `message` (one size on all) reaches every rank, in
  // `table` (rank q's at q * message.size()), once the leader has checked them with `check`.
  // Returns the leader's answer: kFailed where `failure` (this rank's own) is set on any rank.
  // Throws nothing: `error` gets the leader's check's error, or a peer's hand-off's. `heard`
  // (if given): whether every rank's message reached the leader and its answer this rank.
  char ExchangeAll(const std::vector<char>& message, std::vector<char>* table,
                   const std::function<void(const std::vector<std::vector<char>>&)>& check,
                   const std::exception_ptr& failure, std::exception_ptr* error, bool* heard = nullptr);
  // Closes this rank's mappings of the allocations that `message`'s sender retired.
  void CloseRetired(const char* message);
  // After a call: frees the old staging buffers whose retirement every peer has now heard of
  // (`delivered`: the call succeeded), else sends this call's retirements again with the next.
  void SettleRetired(bool delivered);
  // At set-up: opens `peer`'s events that this rank waits for, and its `probe` buffer where this
  // rank reads its buffers. False where CUDA IPC fails.
  bool OpenFrom(int peer, const cudaIpcEventHandle_t& ready, const cudaIpcEventHandle_t& done, const IpcBuffer& probe);
  // A barrier of the group's ranks, through the leader (timed, like every wait): true where every
  // rank came `ok`.
  bool MeetAll(bool ok);
  void ReleasePeerEvents();
  void ReleaseEvents();
  // Orders `stream` after `event`'s last record: on the device or on the host, as sync_ says.
  void After(cudaEvent_t event, cudaStream_t stream, int peer);
  // A call that fails after some rank queued work (part of it, even) may leave that work writing
  // into other ranks' buffers. So that nothing the caller queues next on `stream` (a rewrite, a
  // free) overtakes it: the rank that queued records `done` after what it queued, and every rank
  // that waits for others' `done` orders `stream` after them (this), once every rank has had its
  // say (each recorded before it told the leader; the leader tells whether it heard every rank).
  // Best effort: the call's own error is the one told.
  void AfterPeersOfFailedCall(cudaStream_t stream);

  Transport& transport_;
  LeaderExchange exchange_;  // each call's hand-off to the leader and its answer
  int device_;
  double timeout_s_;
  DeviceSync sync_;
  DeviceWork work_;
  bool quiesced_ = false;
  bool ipc_ = true;
  cudaEvent_t ready_ = nullptr;         // this rank's: its inputs are written
  cudaEvent_t done_ = nullptr;          // this rank's: the work it queued is done
  cudaEvent_t staging_free_ = nullptr;  // this rank's: the last stage-out has read staging_
  // Other ranks' ready and done events, opened through IPC where this rank waits for them
  // (null elsewhere): the leader waits for every `ready`, its peers for the leader's `done`;
  // split, every rank for every other's.
  std::vector<cudaEvent_t> peer_ready_, peer_done_;
  IpcExporter exporter_;
  std::shared_ptr<IpcImporter> importer_;  // this process's, on this GPU (shared with other groups)
  Scratch staging_{Memory::kDevice};       // exportable memory for buffers from stream-ordered pools
  bool staged_this_call_ = false;          // whether the call in progress queued work on staging_
  // Staging buffers outgrown but maybe still open on peers: freed once they have closed them.
  struct RetiredStaging {
    char* ptr;
    cudaIpcMemHandle_t handle;
    bool exported;  // else no peer can have it open
  };
  std::vector<RetiredStaging> retired_staging_;
  std::vector<cudaIpcMemHandle_t> sent_retired_;  // the retirements this call's message carries
};

}  // namespace pycomm::cuda
