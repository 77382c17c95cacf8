// The interposer reads MPI handles as the MPICH ABI it was built against. A program on another
// MPI (Open MPI, or the MPI-5 standard ABI's libmpi_abi.so) passes handles that mean something
// else: that must stop the program with a clear message, never reach the engine.
#pragma once

namespace pycomm {
namespace preload {

// Aborts, saying why, if the MPI_Allreduce this library hides is not in the libmpi that its own
// PMPI_Allreduce comes from. Cheap after the first call.
void CheckSameMpi();

}  // namespace preload
}  // namespace pycomm
