// pycomm: allreduce and its relatives for data-parallel training.
//
// The public C++ API is this one header. A Communicator is created over an MPI communicator and
// runs collectives on raw host buffers. Every call is collective: all ranks of the communicator
// must make the same calls, in the same order, with the same count, dtype, op and root.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace pycomm {

enum class DataType : int {
  kFloat16 = 0,
  kBFloat16,
  kFloat32,
  kFloat64,
  kInt8,
  kUInt8,
  kInt32,
  kInt64,
  kUInt32,
  kUInt64,
};
constexpr int kNumDataTypes = 10;

// kAvg is a sum divided by the communicator size; it is defined for floating-point types only.
enum class ReduceOp : int { kSum = 0, kProd, kMin, kMax, kAvg };
constexpr int kNumReduceOps = 5;

size_t DataTypeSize(DataType dtype);
const char* DataTypeName(DataType dtype);
const char* ReduceOpName(ReduceOp op);
bool IsFloatingPoint(DataType dtype);

// Host time per phase of the device collectives' calls in this process, for benchmarks' latency
// breakdowns. SetPhaseTiming(true) zeroes the sums and starts them; false stops them. A call
// counts only if timing was on, unchanged, from its start to its end.
struct PhaseTime {
  std::string phase;  // "<role>: <what>", as first entered
  double seconds;     // summed over the calls
  uint64_t laps;      // how many calls entered it
};
void SetPhaseTiming(bool on);
std::vector<PhaseTime> PhaseTimes();

// True when this build has the CUDA parts (device collectives).
bool BuiltWithCuda();
// The GPU that `ptr` (device memory) is on, asked of the driver; null, an empty array's pointer:
// the current device. std::invalid_argument where `ptr` is not GPU memory; CommError without CUDA.
int DeviceOfPointer(const void* ptr);
// Work queued on `stream` from now on runs after the work queued so far on `producer`, two
// cudaStream_t of the GPU that `ptr` is on (an event between them: nothing waits on the host).
// For arrays whose producer names a stream other than the one the work goes on
// (__cuda_array_interface__'s "stream"). CommError without CUDA.
void OrderAfterStream(const void* ptr, void* stream, void* producer);
// Makes GPU `device` current on the calling thread until the returned token goes (on the same
// thread), which gives the thread back the context it had: none, if it had none. For calls into
// libraries that act on the current device (a DLPack export). CommError without CUDA.
std::shared_ptr<void> UseDevice(int device);

// The MPI library this build was compiled against, e.g. "MPICH 5.0.2" or "Open MPI 5.0.6".
const char* MpiBuildVersion();

// Every error pycomm raises. After a CommError other than a bad argument the communicator is
// unusable.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Ranks made different calls (count, dtype or op) at the same point. Raised on every rank.
class MismatchError : public CommError {
 public:
  using CommError::CommError;
};

// A peer died, stopped participating, or did not answer within the timeout.
class PeerError : public CommError {
 public:
  PeerError(const std::string& what, int peer) : CommError(what), peer_(peer) {}
  int peer() const { return peer_; }  // -1 when unknown

 private:
  int peer_;
};

// Which allreduce algorithm to run. kAuto picks by size and by what the ranks share; the others
// force one (for tests and benchmarks).
enum class Algorithm : int {
  kAuto = 0,
  kRing,     // chunked, pipelined ring over point-to-point messages: any size, any placement
  kOneShot,  // every rank reduces everyone's data from shared memory: small messages, one node
  // Reduce-scatter inside each node over shared memory, allreduce of the slices across nodes,
  // allgather inside each node: several nodes. Runs the ring where the ranks share one node.
  kHierarchical,
  kSingleCopy,  // ranks read each other's buffers (process_vm_readv): large messages, one node
};
constexpr int kNumAlgorithms = 5;

// How the hierarchical allreduce moves slices between nodes.
enum class InterNode : int {
  kAuto = 0,  // MPI's own allreduce where it reduces the dtype, else the ring
  kMpi,       // MPI_Iallreduce (float16 and bfloat16, which MPI lacks, take the ring)
  kRing,      // pycomm's ring over MPI point-to-point
};
constexpr int kNumInterNode = 3;

// Options::chunk_bytes' bounds: one element of the widest dtype; and a size past which larger
// chunks gain nothing, while each communicator holds a few of them.
constexpr size_t kMinChunkBytes = 8;
constexpr size_t kMaxChunkBytes = size_t{256} << 20;

struct Options {
  // Collectives move data in chunks of this many bytes so that sending, receiving and reducing
  // overlap. Small values let tests reach multi-chunk paths with small arrays. From
  // kMinChunkBytes to kMaxChunkBytes.
  size_t chunk_bytes = size_t{1} << 20;
  // A wait on a peer that lasts longer than this raises PeerError.
  double timeout_s = 300.0;
  // Prefix debug lines on stderr with the rank.
  bool debug = false;
  // kOneShot and kSingleCopy run only where all ranks share a node (elsewhere the ring does);
  // kSingleCopy also only where every rank may read its peers' memory.
  Algorithm algorithm = Algorithm::kAuto;
  InterNode inter_node = InterNode::kAuto;
  // Blocking calls only: no progress thread is started and AllreduceAsync throws CommError.
  // Every operation then runs on the calling thread, so FromMpi accepts MPI at any thread level
  // (an unchanged MPI program that called MPI_Init), not only MPI_THREAD_MULTIPLE.
  bool blocking_only = false;
};

// The handle of one asynchronous operation.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation has finished; rethrows its error.
  virtual void Wait() = 0;
  // True once the operation has finished (successfully or not); never blocks.
  virtual bool Done() const = 0;
  // How long the operation ran once it started (seconds); 0 until it has finished. Lets a
  // caller tell the time spent communicating from the time it spent waiting for it.
  virtual double Seconds() const = 0;
};

class Transport;

class Communicator {
 public:
  // Creates a communicator over a private duplicate of an MPI intracommunicator. `mpi_comm` is
  // the MPI_Comm handle converted to intptr_t (MPICH's handles are ints, Open MPI's pointers).
  // Collective over `mpi_comm`. MPI must be initialised with MPI_THREAD_MULTIPLE, unless
  // options.blocking_only is set.
  static std::unique_ptr<Communicator> FromMpi(intptr_t mpi_comm, const Options& options = {});
  // Creates a communicator over any transport (tests use an in-process loopback).
  static std::unique_ptr<Communicator> FromTransport(std::unique_ptr<Transport> transport, const Options& options = {});

  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_rank() const = 0;  // rank among the ranks on this node
  virtual int local_size() const = 0;
  virtual const Options& options() const = 0;

  // recv[i] = op over ranks of send[i], for i < count. In place when send == recv.
  virtual void Allreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op) = 0;
  // As Allreduce, queued behind earlier operations and run on the communicator's progress thread.
  // The buffers must stay valid until the returned Work is done.
  virtual std::shared_ptr<Work> AllreduceAsync(const void* send, void* recv, size_t count, DataType dtype,
                                               ReduceOp op) = 0;
  // send holds size() * recv_count elements; recv gets block rank() of their reduction.
  virtual void ReduceScatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op) = 0;
  // recv (size() * send_count elements) gets every rank's send, in rank order.
  virtual void Allgather(const void* send, void* recv, size_t send_count, DataType dtype) = 0;
  // buf on every rank gets root's buf.
  virtual void Broadcast(void* buf, size_t count, DataType dtype, int root) = 0;
  virtual void Barrier() = 0;

  // Collective. Memory for `bytes` of this rank's data inside a segment that every rank of the
  // node maps (`*data` points to it). Allreduce in place on data there, at the same offset on
  // every rank, copies nothing in or out. Returns the owner of the mapping, to keep while the
  // memory is used; null (and *data null) where the ranks do not all share a node.
  virtual std::shared_ptr<void> AllocateShared(size_t bytes, void** data) = 0;

  // The same collectives on device (CUDA) buffers of GPU `device`. Every rank must be on one node.
  // Work is enqueued on `stream` (a cudaStream_t; nullptr is the legacy default stream) and each
  // call returns without waiting for the GPU, as NCCL's do: work queued on `stream` afterwards
  // sees the result.
  virtual void AllreduceDevice(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op, int device,
                               void* stream) = 0;
  virtual void ReduceScatterDevice(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                                   int device, void* stream) = 0;
  virtual void AllgatherDevice(const void* send, void* recv, size_t send_count, DataType dtype, int device,
                               void* stream) = 0;
  virtual void BroadcastDevice(void* buf, size_t count, DataType dtype, int root, int device, void* stream) = 0;
  // Waits for queued operations, then releases the transport. Idempotent; later calls throw.
  virtual void Close() = 0;
  // True once a call on any communicator of this process failed with PeerError (a peer died or
  // stopped answering). The MPI job cannot then end cleanly: MPI_Finalize waits for every rank.
  static bool AnyPeerFailed();
};

}  // namespace pycomm
