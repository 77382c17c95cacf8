// MPI_Allreduce and MPI_Allreduce_c, interposed through the PMPI profiling interface: the cases
// the engine supports run on it, every other call goes to PMPI_Allreduce unchanged.
//
// MPI_Iallreduce and MPI_Allreduce_init are not defined here, so they reach MPI itself: the
// engine's communicators are blocking-only (no progress thread, any thread level).

#include <mpi.h>

#include <atomic>
#include <string>

#include "preload/abi_check.h"
#include "preload/engine_cache.h"
#include "preload/errors.h"
#include "preload/log.h"
#include "preload/mpi_types.h"
#include "pycomm/pycomm.h"

namespace pycomm {
namespace preload {

namespace {

std::atomic<unsigned long long> g_engine_calls{0};
std::atomic<unsigned long long> g_passed_through{0};

std::string TypeName(MPI_Datatype datatype) {
  char name[MPI_MAX_OBJECT_NAME] = {0};
  int len = 0;
  if (PMPI_Type_get_name(datatype, name, &len) != MPI_SUCCESS || len == 0) return "a derived datatype";
  return std::string(name, len);
}

// Reasons that the debug line spells out with the datatype's or op's name (compared by address).
constexpr char kUnsupportedType[] = "datatype";
constexpr char kUnsupportedOp[] = "op";

// Why this call cannot run on the engine; null when it can. Erroneous buffers aside (null, or the
// same to send and receive: MPI refuses those on the calling rank), the decision reads only what
// MPI requires to be the same on every rank (count, datatype, op, the communicator and MPI's
// state), so every rank decides alike and no rank waits in the engine for a peer that went to MPI.
const char* PassThroughReason(const void* send, const void* recv, MPI_Count count, MPI_Datatype datatype, MPI_Op op,
                              MPI_Comm comm, DataType* dtype, ReduceOp* reduce_op) {
  int initialized = 0, finalized = 0;
  PMPI_Initialized(&initialized);
  PMPI_Finalized(&finalized);
  if (!initialized) return "MPI is not initialised";
  if (finalized || EnginesClosed()) return "MPI_Finalize has begun";
  // Erroneous calls go to MPI, which reports them as it always does.
  if (comm == MPI_COMM_NULL) return "MPI_COMM_NULL";
  if (count < 0) return "a negative count";
  if (recv == MPI_IN_PLACE) return "MPI_IN_PLACE as the receive buffer";
  if (count > 0 && (send == nullptr || recv == nullptr)) return "a null buffer";
  if (count > 0 && send == recv) return "the same buffer to send and receive (not MPI_IN_PLACE)";
  if (!EngineDataType(datatype, dtype)) return kUnsupportedType;
  if (!EngineReduceOp(op, reduce_op)) return kUnsupportedOp;
  int inter = 0;
  if (PMPI_Comm_test_inter(comm, &inter) != MPI_SUCCESS) return "not a valid communicator";
  if (inter) return "an intercommunicator";
  return nullptr;
}

// The debug line's reason, naming the datatype or op (only asked for under PYCOMM_DEBUG: an
// invalid datatype handle must reach PMPI_Allreduce, not fail in PMPI_Type_get_name first).
std::string Explain(const char* reason, MPI_Datatype datatype, MPI_Op op) {
  if (reason == kUnsupportedType) return "datatype " + TypeName(datatype) + ": not a type the engine reduces";
  if (reason == kUnsupportedOp) {
    return std::string("op ") + OpName(op) + ": the engine runs MPI_SUM, MPI_PROD, MPI_MIN and MPI_MAX only";
  }
  return reason;
}

// Returns true (and sets *rc) when the engine ran the call; false to pass it through.
bool RunOnEngine(const char* call, const void* send, void* recv, MPI_Count count, MPI_Datatype datatype, MPI_Op op,
                 MPI_Comm comm, int* rc) {
  CheckSameMpi();
  DataType dtype;
  ReduceOp reduce_op;
  if (const char* reason = PassThroughReason(send, recv, count, datatype, op, comm, &dtype, &reduce_op)) {
    g_passed_through.fetch_add(1, std::memory_order_relaxed);
    if (DebugEnabled()) Debug("%s passes through to PMPI: %s", call, Explain(reason, datatype, op).c_str());
    return false;
  }
  g_engine_calls.fetch_add(1, std::memory_order_relaxed);
  if (DebugEnabled()) {
    Debug("%s on the engine: %s x %lld %s%s", call, DataTypeName(dtype), static_cast<long long>(count),
          ReduceOpName(reduce_op), send == MPI_IN_PLACE ? " (in place)" : "");
  }
  try {
    Communicator& engine = EngineFor(comm);
    engine.Allreduce(send == MPI_IN_PLACE ? recv : send, recv, static_cast<size_t>(count), dtype, reduce_op);
    *rc = MPI_SUCCESS;
  } catch (...) {
    *rc = ReportEngineError(comm, call);
  }
  return true;
}

}  // namespace

}  // namespace preload
}  // namespace pycomm

extern "C" {

int MPI_Allreduce(const void* sendbuf, void* recvbuf, int count, MPI_Datatype datatype, MPI_Op op, MPI_Comm comm) {
  int rc;
  if (pycomm::preload::RunOnEngine("MPI_Allreduce", sendbuf, recvbuf, count, datatype, op, comm, &rc)) return rc;
  return PMPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm);
}

#if MPI_VERSION >= 4
// The large-count form (MPI-4), which mpi4py calls on MPICH 4 and later.
int MPI_Allreduce_c(const void* sendbuf, void* recvbuf, MPI_Count count, MPI_Datatype datatype, MPI_Op op,
                    MPI_Comm comm) {
  int rc;
  if (pycomm::preload::RunOnEngine("MPI_Allreduce_c", sendbuf, recvbuf, count, datatype, op, comm, &rc)) return rc;
  return PMPI_Allreduce_c(sendbuf, recvbuf, count, datatype, op, comm);
}
#endif

// How many MPI_Allreduce / MPI_Allreduce_c calls this process ran on the engine and how many it
// passed through, so that programs and tests can see the engine at work (dlsym it: it exists only
// when the interposer is loaded).
void pycomm_preload_stats(unsigned long long* engine_calls, unsigned long long* passed_through) {
  if (engine_calls) *engine_calls = pycomm::preload::g_engine_calls.load();
  if (passed_through) *passed_through = pycomm::preload::g_passed_through.load();
}

}  // extern "C"
