#include "transport/mpi_transport.h"

#include <dlfcn.h>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "pycomm/pycomm.h"
#include "transport/peer_watch.h"
#include "transport/shared_arena.h"

namespace pycomm {

namespace {

// MPIX_Query_cuda_support() is an extension of both MPICH and Open MPI, declared in different
// headers: looked up at run time in the library that defines MPI_Init, so pycomm builds against
// either. Python loads that library privately, so the global symbol scope does not have it.
bool MpiReportsCudaSupport() {
  static const bool supported = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&MPI_Init), &info) || !info.dli_fname) return false;
    void* library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!library) return false;
    auto query = reinterpret_cast<int (*)()>(dlsym(library, "MPIX_Query_cuda_support"));
    const bool yes = query && query() == 1;
    dlclose(library);
    return yes;
  }();
  return supported;
}

// All of pycomm's traffic on its private communicator uses one tag, so that MPI's non-overtaking
// rule gives the ordering the Transport contract promises.
constexpr int kTag = 0x70c;

void Check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw CommError(std::string("pycomm: ") + what + " failed: " + std::string(text, len));
}

class MpiRequest : public Request {
 public:
  enum Kind { kSend, kRecv, kCollective };
  MpiRequest(MPI_Request request, int peer, Kind kind, const PeerWatch* watch)
      : request_(request), peer_(peer), kind_(kind), watch_(watch) {}

  ~MpiRequest() override {
    // Reached with an active request only when a collective is abandoned after an error. MPI
    // forbids freeing or cancelling a nonblocking collective: that one is left to MPI_Finalize.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (request_ == MPI_REQUEST_NULL || finalized || kind_ == kCollective) return;
    if (kind_ == kRecv) MPI_Cancel(&request_);
    MPI_Request_free(&request_);
  }

  bool Test() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    Check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), kNames[kind_]);
    // MPI itself may never notice that a rank on this node died: a message it owes never comes.
    if (!done && watch_ && (++polls_ & PeerWatch::kPollMask) == 0) watch_->Check();
    return done != 0;
  }

  int peer() const override { return peer_; }

 private:
  static constexpr const char* kNames[] = {"MPI_Test(send)", "MPI_Test(recv)", "MPI_Test(MPI_Iallreduce)"};
  MPI_Request request_;
  int peer_;
  Kind kind_;
  const PeerWatch* watch_;
  unsigned polls_ = 0;
};

// MPI's datatype for `dtype`; MPI_DATATYPE_NULL for the 16-bit floats (no portable MPI type).
MPI_Datatype MpiDataType(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return MPI_FLOAT;
    case DataType::kFloat64:
      return MPI_DOUBLE;
    case DataType::kInt8:
      return MPI_INT8_T;
    case DataType::kUInt8:
      return MPI_UINT8_T;
    case DataType::kInt32:
      return MPI_INT32_T;
    case DataType::kInt64:
      return MPI_INT64_T;
    case DataType::kUInt32:
      return MPI_UINT32_T;
    case DataType::kUInt64:
      return MPI_UINT64_T;
    default:
      return MPI_DATATYPE_NULL;
  }
}

MPI_Op MpiOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // the caller divides
      return MPI_SUM;
    case ReduceOp::kProd:
      return MPI_PROD;
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kMax:
      return MPI_MAX;
  }
  return MPI_OP_NULL;
}

class MpiTransport : public Transport {
 public:
  // `names[q]`: how errors name rank q of `parent` (empty: q). `watch`: the whole communicator's
  // watch, for a transport over a subgroup of it (null: watch parent's ranks).
  MpiTransport(MPI_Comm parent, bool caller_thread_only, std::vector<int> names = {},
               std::shared_ptr<const PeerWatch> watch = nullptr)
      : caller_thread_only_(caller_thread_only), names_(std::move(names)), watch_(std::move(watch)) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) throw CommError("pycomm: MPI is not initialised (import mpi4py.MPI first)");
    int provided = 0;
    MPI_Query_thread(&provided);
    // A progress thread calls MPI while the application may too; a caller-thread-only transport
    // calls MPI only where the application itself could.
    if (provided < MPI_THREAD_MULTIPLE && !caller_thread_only) {
      throw CommError(
          "pycomm: MPI was initialised below MPI_THREAD_MULTIPLE (mpi4py's default); pycomm needs it for asynchronous "
          "calls (a blocking-only communicator does not)");
    }
    int inter = 0;
    Check(MPI_Comm_test_inter(parent, &inter), "MPI_Comm_test_inter");
    if (inter) throw CommError("pycomm: intercommunicators are not supported");
    Check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm node = NodeComm();
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_size(node, &local_size_);
    int node_leader = rank_;  // the node's id: its lowest rank in comm_
    Check(MPI_Bcast(&node_leader, 1, MPI_INT, 0, node), "MPI_Bcast");
    MPI_Comm_free(&node);
    const std::vector<ProcessIdentity> processes = AllProcesses(node_leader);
    if (names_.empty()) {
      for (int q = 0; q < size_; ++q) names_.push_back(q);
    }
    // A subgroup's waits notice any rank of the whole communicator dying, and name the first.
    if (!watch_) watch_ = std::make_shared<PeerWatch>(rank_, processes, names_);
    NumberNodes(processes);
    // PYCOMM_SHM=0 keeps every byte on MPI (like NCCL_SHM_DISABLE): for debugging and tests.
    const char* shm = std::getenv("PYCOMM_SHM");
    const bool shm_allowed = !(shm && std::string(shm) == "0");
    if (local_size_ == size_ && size_ > 1 && shm_allowed) arena_ = CreateArena();
    if (arena_) {
      arena_->set_peer_watch(watch_.get());
      arena_->set_rank_names(names_);
    }
  }

  ~MpiTransport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  const char* name() const override { return arena_ ? "mpi+shm" : "mpi"; }
  void CheckPeersAlive() override {
    if (watch_) watch_->Check(true);
  }
  SharedArena* arena() override { return arena_.get(); }

  std::unique_ptr<Request> Isend(int peer, const void* buf, size_t bytes) override {
    MPI_Request request;
#if MPI_VERSION >= 4
    Check(MPI_Isend_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Isend_c");
#else
    Check(MPI_Isend(buf, CheckedCount(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Isend");
#endif
    return std::make_unique<MpiRequest>(request, names_[peer], MpiRequest::kSend, watch_.get());
  }

  std::unique_ptr<Request> Irecv(int peer, void* buf, size_t bytes) override {
    MPI_Request request;
#if MPI_VERSION >= 4
    Check(MPI_Irecv_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Irecv_c");
#else
    Check(MPI_Irecv(buf, CheckedCount(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Irecv");
#endif
    return std::make_unique<MpiRequest>(request, names_[peer], MpiRequest::kRecv, watch_.get());
  }

  std::shared_ptr<void> MapShared(size_t total_bytes) override {
    if (!arena_) return nullptr;  // the ranks do not all share this node
    return MapSharedSegment(rank_, total_bytes, NameFromRoot(), AllAgree());
  }

  int node_of(int rank) const override { return node_of_[rank]; }

  bool accepts_device_memory() const override { return MpiReportsCudaSupport(); }

  std::unique_ptr<Transport> Subgroup(const std::vector<int>& ranks, int tag) override {
    MPI_Group all, part;
    Check(MPI_Comm_group(comm_, &all), "MPI_Comm_group");
    Check(MPI_Group_incl(all, static_cast<int>(ranks.size()), ranks.data(), &part), "MPI_Group_incl");
    MPI_Comm sub;
    // Collective over the group's members only: ranks outside it go on undisturbed.
    const int rc = MPI_Comm_create_group(comm_, part, tag, &sub);
    MPI_Group_free(&part);
    MPI_Group_free(&all);
    Check(rc, "MPI_Comm_create_group");
    std::vector<int> names;
    for (int q : ranks) names.push_back(names_[q]);
    std::unique_ptr<Transport> transport;
    try {
      transport = std::make_unique<MpiTransport>(sub, caller_thread_only_, std::move(names), watch_);
    } catch (...) {
      MPI_Comm_free(&sub);
      throw;
    }
    MPI_Comm_free(&sub);  // the transport holds its own duplicate
    return transport;
  }

  std::unique_ptr<Request> IallreduceInPlace(void* buf, size_t count, DataType dtype, ReduceOp op) override {
    const MPI_Datatype type = MpiDataType(dtype);
    if (type == MPI_DATATYPE_NULL) return nullptr;
    MPI_Request request;
#if MPI_VERSION >= 4
    Check(MPI_Iallreduce_c(MPI_IN_PLACE, buf, static_cast<MPI_Count>(count), type, MpiOp(op), comm_, &request),
          "MPI_Iallreduce_c");
#else
    Check(MPI_Iallreduce(MPI_IN_PLACE, buf, CheckedCount(count), type, MpiOp(op), comm_, &request), "MPI_Iallreduce");
#endif
    return std::make_unique<MpiRequest>(request, -1, MpiRequest::kCollective, watch_.get());
  }

 private:
#if MPI_VERSION < 4
  static int CheckedCount(size_t bytes) {
    if (bytes > static_cast<size_t>(INT_MAX)) throw CommError("pycomm: message over INT_MAX bytes on an MPI-3 library");
    return static_cast<int>(bytes);
  }
#endif

  // The ranks of comm_ on this rank's node. PYCOMM_NODE_ID (set per process) or
  // PYCOMM_RANKS_PER_NODE=k (world ranks 0..k-1 on one node, k..2k-1 on the next, ...) override
  // what MPI says, so that one machine can stand for several nodes: ranks of different nodes then
  // share no memory and talk through MPI only.
  MPI_Comm NodeComm() {
    const char* id = std::getenv("PYCOMM_NODE_ID");
    const char* per_node = std::getenv("PYCOMM_RANKS_PER_NODE");
    const bool override = (id && *id) || (per_node && *per_node);
    long color = 0;
    bool ok = true;
    if (id && *id) {
      ok = ParseCount(id, &color, 0);
    } else if (per_node && *per_node) {
      long k = 0;
      int world_rank = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
      ok = ParseCount(per_node, &k, 1);
      color = ok ? world_rank / k : 0;
    }
    // Every rank learns whether any rank's setting was bad before anyone splits on it.
    if (!AllAgree()(ok)) {
      throw CommError(
          "pycomm: PYCOMM_NODE_ID must be an integer >= 0 and PYCOMM_RANKS_PER_NODE one >= 1 (on every rank)");
    }
    MPI_Comm node;
    if (!AllAgree()(!override)) {  // any rank overrides: all must
      if (!AllAgree()(override))
        throw CommError("pycomm: PYCOMM_NODE_ID / PYCOMM_RANKS_PER_NODE is set on some ranks only");
      Check(MPI_Comm_split(comm_, static_cast<int>(color), rank_, &node), "MPI_Comm_split");
    } else {
      Check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    }
    return node;
  }

  static bool ParseCount(const char* text, long* value, long min) {
    char* end = nullptr;
    *value = std::strtol(text, &end, 10);
    return end != text && *end == '\0' && *value >= min && *value <= INT_MAX;
  }

  std::function<std::string(const std::string&)> NameFromRoot() {
    return [this](const std::string& name) {
      char buffer[256] = {0};
      if (rank_ == 0) std::snprintf(buffer, sizeof buffer, "%s", name.c_str());
      Check(MPI_Bcast(buffer, sizeof buffer, MPI_CHAR, 0, comm_), "MPI_Bcast");
      return std::string(buffer);
    };
  }

  std::function<bool(bool)> AllAgree() {
    return [this](bool ok) {
      int mine = ok ? 1 : 0, all = 0;
      // PMPI_: under the preloaded interposer (csrc/preload) MPI_Allreduce is pycomm itself.
      Check(PMPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, comm_), "PMPI_Allreduce");
      return all != 0;
    };
  }

  // Every rank is on this node: a shared segment carries the small-message algorithms.
  std::unique_ptr<SharedArena> CreateArena() {
    return CreateShmArena(rank_, size_, kArenaSlotBytes, NameFromRoot(), AllAgree());
  }

  // Every rank's process and node, so that waits notice a dead rank on this node.
  std::vector<ProcessIdentity> AllProcesses(int node_leader) {
    const ProcessIdentity self = ThisProcess(node_leader);
    std::vector<ProcessIdentity> all(size_);
    static_assert(sizeof(ProcessIdentity) == 3 * sizeof(int64_t), "sent as three int64");
    Check(MPI_Allgather(&self, 3, MPI_INT64_T, all.data(), 3, MPI_INT64_T, comm_), "MPI_Allgather");
    return all;
  }

  // Node q is the q-th distinct node leader in rank order (leaders are their node's lowest rank).
  void NumberNodes(const std::vector<ProcessIdentity>& processes) {
    std::vector<int64_t> leaders;
    for (const ProcessIdentity& p : processes) {
      auto it = std::find(leaders.begin(), leaders.end(), p.node);
      node_of_.push_back(static_cast<int>(it - leaders.begin()));
      if (it == leaders.end()) leaders.push_back(p.node);
    }
  }

  const bool caller_thread_only_;
  std::vector<int> names_;  // per rank: how errors name it
  std::shared_ptr<const PeerWatch> watch_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<int> node_of_;  // per rank
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::unique_ptr<SharedArena> arena_;
};

}  // namespace

const char* MpiBuildVersion() {
#define PYCOMM_STR2(x) #x
#define PYCOMM_STR(x) PYCOMM_STR2(x)
#if defined(MPICH_VERSION)
  return "MPICH " MPICH_VERSION;
#elif defined(OMPI_MAJOR_VERSION)
  return "Open MPI " PYCOMM_STR(OMPI_MAJOR_VERSION) "." PYCOMM_STR(OMPI_MINOR_VERSION) "." PYCOMM_STR(
      OMPI_RELEASE_VERSION);
#else
  return "MPI " PYCOMM_STR(MPI_VERSION) "." PYCOMM_STR(MPI_SUBVERSION);
#endif
#undef PYCOMM_STR
#undef PYCOMM_STR2
}

std::unique_ptr<Transport> CreateMpiTransport(intptr_t mpi_comm, bool caller_thread_only) {
  // MPICH's MPI_Comm is an int and Open MPI's a pointer; both round-trip through intptr_t.
  return std::make_unique<MpiTransport>((MPI_Comm)mpi_comm, caller_thread_only);
}

}  // namespace pycomm
