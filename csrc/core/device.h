// Collectives on device (GPU) buffers. The communicator talks to this interface only; the CUDA
// implementation lives in csrc/cuda and is linked in when pycomm is built with CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "pycomm/pycomm.h"
#include "transport/transport.h"

namespace pycomm {

class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
  virtual int device() const = 0;
  // How the ranks order their GPU work: "host" or "stream" (PYCOMM_GPU_SYNC; auto decided).
  virtual const char* sync_name() const = 0;
  // Who does a node's work: "leader" or "split" (PYCOMM_GPU_WORK; auto decided).
  virtual const char* work_name() const = 0;
  // `stream` is a cudaStream_t. Each call enqueues its work there and returns without waiting for
  // the GPU; work queued on `stream` afterwards sees the result.
  virtual void Allreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op, void* stream) = 0;
  virtual void ReduceScatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                             void* stream) = 0;
  virtual void Allgather(const void* send, void* recv, size_t send_count, DataType dtype, void* stream) = 0;
  virtual void Broadcast(void* buf, size_t count, DataType dtype, int root, void* stream) = 0;
  // Collective, the last call before teardown: waits until no rank's queued GPU work can still
  // use another rank's buffers or events. Throws (PeerError within the time-out) where a rank
  // does not come, before waiting for the GPU: then tearing down could wait forever too.
  virtual void Quiesce() = 0;
};

// BuiltWithCuda() and DeviceOfPointer() are declared in pycomm/pycomm.h.

struct Hierarchy;

// Collective over `transport`. Throws CommError when pycomm was built without CUDA. `arena_seq`
// counts the rounds made through transport.arena() (the communicator's counter: each device call
// may take some). Across nodes the device collectives run over the groups of `hierarchy` (its
// node group, and the owners of slice 0: each node's lowest rank), built with the communicator,
// so that no blocking MPI call happens inside a call. From `options`: the time-out, the bytes per
// message of the host ring between node leaders, and the host algorithm (PYCOMM_ALGO) where the
// ranks combine their parts through the host on one node.
std::unique_ptr<DeviceCollectives> CreateDeviceCollectives(Transport& transport, uint64_t* arena_seq,
                                                           Hierarchy* hierarchy, int device, const Options& options);

}  // namespace pycomm
