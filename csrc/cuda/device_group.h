// Ranks of one node that hand their device buffers to a leader rank for each collective.
//
// Several ranks may share one GPU, and processes on one GPU do not run kernels concurrently, so
// splitting a collective's work across them gains nothing: one kernel on the leader that reads
// every rank's input once and writes every rank's output once moves the fewest bytes through the
// GPU's memory. Order across processes comes from CUDA IPC events and host messages, never from
// spinning on the device:
//   1. every rank records `ready` on its stream (its input is written), then hands the leader the
//      IPC handles of its buffers (through the node's shared arena where there is one);
//   2. the leader makes its stream wait for every `ready`, enqueues the work, records `done`, and
//      answers every rank;
//   3. every rank makes its stream wait for `done`.
// No call waits for the GPU: each returns once its stream holds the right dependencies, as NCCL's do.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

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

// The leader's view of one call: buffers[rank][i] is rank's i-th BufferRef, mapped into the
// leader's address space.
using LeaderWork = std::function<void(const std::vector<std::vector<void*>>& buffers, cudaStream_t stream)>;

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

class DeviceGroup {
 public:
  // Collective over `transport`, whose ranks must all be on this node. `device` is this rank's GPU.
  // `arena_seq` counts the rounds of transport.arena() (see LeaderExchange); null: hand-offs go
  // as messages. `sync`: as asked for on this rank; kAuto takes the leader's decision.
  DeviceGroup(Transport& transport, uint64_t* arena_seq, int device, double timeout_s, DeviceSync sync);
  ~DeviceGroup();

  int device() const { return device_; }
  DeviceSync sync() const { return sync_; }  // never kAuto

  // Runs one collective: every rank passes the same number of buffers, in the same roles.
  // A failure on any rank fails the call on every rank; a rank whose `call` differs from the
  // leader's gets MismatchError, as does the leader. On the leader, `agree` (if any) is told,
  // before any work, whether the node can go on (0), failed (1) or made mismatched calls (2),
  // and may throw to stop it: for agreeing with other nodes.
  void Run(const DeviceCall& call, const std::vector<BufferRef>& buffers, cudaStream_t stream, const LeaderWork& work,
           const std::function<void(int trouble)>& agree = nullptr);
  // Collective: waits until no rank's queued GPU work can still use the group's events or another
  // rank's buffers, so that teardown is safe.
  void Quiesce();

 private:
  static constexpr int kLeader = 0;
  struct Message;

  // Returns where the leader can reach buffers[i], staging buffers that cannot be exported.
  void Describe(const std::vector<BufferRef>& buffers, cudaStream_t stream, std::vector<IpcBuffer>* out,
                std::vector<size_t>* staged_at);
  void ReleaseEvents();
  // Orders `stream` after `event`'s last record: on the device or on the host, as sync_ says.
  void After(cudaEvent_t event, cudaStream_t stream, int peer);

  Transport& transport_;
  LeaderExchange exchange_;  // each call's hand-off to the leader and its answer
  int device_;
  double timeout_s_;
  DeviceSync sync_;
  cudaEvent_t ready_ = nullptr;          // this rank's: its inputs are written
  cudaEvent_t staging_free_ = nullptr;   // this rank's: the last stage-out has read staging_
  cudaEvent_t done_ = nullptr;           // the leader's (opened through IPC on other ranks)
  std::vector<cudaEvent_t> peer_ready_;  // on the leader: every rank's ready event
  IpcExporter exporter_;
  IpcImporter importer_;
  Scratch staging_{Memory::kDevice};  // exportable memory for buffers from stream-ordered pools
};

}  // namespace pycomm::cuda
