// Which MPI datatypes and ops the engine reduces, and as what. Everything else passes through.
#pragma once

#include <mpi.h>

#include "pycomm/pycomm.h"

namespace pycomm {
namespace preload {

// The engine's type for a predefined MPI datatype it reduces bit for bit like MPI (same width and
// representation); false for every other datatype, derived ones included.
bool EngineDataType(MPI_Datatype datatype, DataType* out);

// MPI_SUM, MPI_PROD, MPI_MIN and MPI_MAX; false for every other op (logical, bitwise, MINLOC and
// MAXLOC, user-defined).
bool EngineReduceOp(MPI_Op op, ReduceOp* out);

// For debug lines: "MPI_LAND", ... or "a user-defined op".
const char* OpName(MPI_Op op);

}  // namespace preload
}  // namespace pycomm
