#include "preload/log.h"

#include <mpi.h>

#include <cstdarg>
#include <cstdio>

#include "preload/settings.h"

namespace pycomm {
namespace preload {

bool DebugEnabled() {
  static const bool enabled = DebugFromEnvironment();
  return enabled;
}

void Debug(const char* fmt, ...) {
  if (!DebugEnabled()) return;
  int initialized = 0, finalized = 0, rank = -1;
  PMPI_Initialized(&initialized);
  PMPI_Finalized(&finalized);
  if (initialized && !finalized) PMPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char line[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(line, sizeof line, fmt, args);
  va_end(args);
  // One write per line, so that ranks sharing a terminal do not interleave mid-line.
  if (rank >= 0) {
    std::fprintf(stderr, "r%d | preload: %s\n", rank, line);
  } else {
    std::fprintf(stderr, "r? | preload: %s\n", line);
  }
}

}  // namespace preload
}  // namespace pycomm
