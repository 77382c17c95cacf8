// The engine's settings for the interposer, from the same PYCOMM_* environment variables the
// Python package reads (README, Settings).
#pragma once

#include "pycomm/pycomm.h"

namespace pycomm {
namespace preload {

// PYCOMM_TIMEOUT, PYCOMM_CHUNK_BYTES, PYCOMM_ALGO, PYCOMM_INTER_NODE and PYCOMM_DEBUG; a value
// that cannot be read is reported on stderr and the default kept (an unchanged program has no
// other way to say so), as is one of PYCOMM_SHM, PYCOMM_CMA or PYCOMM_KERNELS that the core
// does not know.
// Always blocking-only: the interposer runs every call on the caller's thread.
Options OptionsFromEnvironment();

// PYCOMM_DEBUG is set to something other than 0, false, no or off.
bool DebugFromEnvironment();

}  // namespace preload
}  // namespace pycomm
