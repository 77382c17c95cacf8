// One pycomm communicator per MPI communicator: created on first use, cached in an attribute of
// that communicator, closed when MPI frees the communicator or when MPI_Finalize begins.
#pragma once

#include <mpi.h>

#include "pycomm/pycomm.h"

namespace pycomm {
namespace preload {

// The engine for intracommunicator `comm`, created on the first call (collective over `comm`:
// every rank reaches it in the same MPI_Allreduce). Throws what creation throws.
Communicator& EngineFor(MPI_Comm comm);

// True from the moment MPI_Finalize starts closing the engines: later calls pass through.
bool EnginesClosed();

}  // namespace preload
}  // namespace pycomm
