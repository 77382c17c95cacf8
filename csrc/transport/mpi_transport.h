// Point-to-point transport over MPI non-blocking sends and receives.
#pragma once

#include <cstdint>
#include <memory>

#include "transport/transport.h"

namespace pycomm {

// Duplicates the MPI communicator behind `mpi_comm` (an MPI_Comm as intptr_t) so that pycomm's
// messages never match the application's. Collective over that communicator. MPI must be at
// MPI_THREAD_MULTIPLE unless `caller_thread_only`: the caller promises that only the threads MPI
// already allows to call it (the application's, one at a time) will drive this transport.
std::unique_ptr<Transport> CreateMpiTransport(intptr_t mpi_comm, bool caller_thread_only = false);

}  // namespace pycomm
