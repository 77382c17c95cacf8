// Debug lines of the interposer under PYCOMM_DEBUG=1, prefixed like the engine's: "r3 | preload: ...".
#pragma once

namespace pycomm {
namespace preload {

bool DebugEnabled();

// printf-style; the rank is the MPI_COMM_WORLD rank where MPI can tell it, else "r?".
void Debug(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace preload
}  // namespace pycomm
