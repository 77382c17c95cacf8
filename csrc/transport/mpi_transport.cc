#include "transport/mpi_transport.h"

#include <mpi.h>

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
  MpiRequest(MPI_Request request, int peer, bool is_recv, const PeerWatch* watch)
      : request_(request), peer_(peer), is_recv_(is_recv), watch_(watch) {}

  ~MpiRequest() override {
    // Reached with an active request only when a collective is abandoned after an error.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (request_ == MPI_REQUEST_NULL || finalized) return;
    if (is_recv_) MPI_Cancel(&request_);
    MPI_Request_free(&request_);
  }

  bool Test() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    Check(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), is_recv_ ? "MPI_Test(recv)" : "MPI_Test(send)");
    // MPI itself may never notice that a rank on this node died: a message it owes never comes.
    if (!done && watch_ && (++polls_ & PeerWatch::kPollMask) == 0) watch_->Check();
    return done != 0;
  }

  int peer() const override { return peer_; }

 private:
  MPI_Request request_;
  int peer_;
  bool is_recv_;
  const PeerWatch* watch_;
  unsigned polls_ = 0;
};

class MpiTransport : public Transport {
 public:
  MpiTransport(MPI_Comm parent, bool caller_thread_only) {
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
    watch_ = WatchPeers(node_leader);
    // PYCOMM_SHM=0 keeps every byte on MPI (like NCCL_SHM_DISABLE): for debugging and tests.
    const char* shm = std::getenv("PYCOMM_SHM");
    const bool shm_allowed = !(shm && std::string(shm) == "0");
    if (local_size_ == size_ && size_ > 1 && shm_allowed) arena_ = CreateArena();
    if (arena_) arena_->set_peer_watch(watch_.get());
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
  SharedArena* arena() override { return arena_.get(); }

  std::unique_ptr<Request> Isend(int peer, const void* buf, size_t bytes) override {
    MPI_Request request;
#if MPI_VERSION >= 4
    Check(MPI_Isend_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Isend_c");
#else
    Check(MPI_Isend(buf, CheckedCount(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Isend");
#endif
    return std::make_unique<MpiRequest>(request, peer, false, watch_.get());
  }

  std::unique_ptr<Request> Irecv(int peer, void* buf, size_t bytes) override {
    MPI_Request request;
#if MPI_VERSION >= 4
    Check(MPI_Irecv_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Irecv_c");
#else
    Check(MPI_Irecv(buf, CheckedCount(bytes), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Irecv");
#endif
    return std::make_unique<MpiRequest>(request, peer, true, watch_.get());
  }

  std::shared_ptr<void> MapShared(size_t total_bytes) override {
    if (!arena_) return nullptr;  // the ranks do not all share this node
    return MapSharedSegment(rank_, total_bytes, NameFromRoot(), AllAgree());
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

  // Every rank's process identity, so that waits notice a dead rank on this node.
  std::unique_ptr<PeerWatch> WatchPeers(int node_leader) {
    const ProcessIdentity self = ThisProcess(node_leader);
    std::vector<ProcessIdentity> all(size_);
    static_assert(sizeof(ProcessIdentity) == 3 * sizeof(int64_t), "sent as three int64");
    Check(MPI_Allgather(&self, 3, MPI_INT64_T, all.data(), 3, MPI_INT64_T, comm_), "MPI_Allgather");
    return std::make_unique<PeerWatch>(rank_, all);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::unique_ptr<PeerWatch> watch_;
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
