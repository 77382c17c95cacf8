// Point-to-point transport over MPI non-blocking sends and receives.
#pragma once

#include <cstdint>
#include <memory>

#include "transport/transport.h"

namespace pycomm {

// Duplicates the MPI communicator behind `mpi_comm` (an MPI_Comm as intptr_t) so that pycomm's
// messages never match the application's. Collective over that communicator.
std::unique_ptr<Transport> CreateMpiTransport(intptr_t mpi_comm);

}  // namespace pycomm
