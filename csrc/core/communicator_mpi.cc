// Communicator::FromMpi lives apart from the communicator so that only this file and the MPI
// transport need MPI: the core library and its loopback tests build without it.

#include "pycomm/pycomm.h"
#include "transport/mpi_transport.h"

namespace pycomm {

std::unique_ptr<Communicator> Communicator::FromMpi(intptr_t mpi_comm, const Options& options) {
  // A blocking-only communicator calls MPI on the caller's thread alone, so any thread level does.
  return FromTransport(CreateMpiTransport(mpi_comm, /*caller_thread_only=*/options.blocking_only), options);
}

}  // namespace pycomm
