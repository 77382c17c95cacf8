// Engine failures reported the way MPI reports its own: through the communicator's error
// handler, then as the call's return code.
#pragma once

#include <mpi.h>

namespace pycomm {
namespace preload {

// Call inside a catch block. Maps the exception in flight to an MPI error class (MPI_ERR_ARG,
// MPI_ERR_NO_MEM, MPI_ERR_OTHER, ...) and a code of that class whose MPI_Error_string is the
// engine's message, invokes `comm`'s error handler with it, and returns it.
int ReportEngineError(MPI_Comm comm, const char* call);

}  // namespace preload
}  // namespace pycomm
