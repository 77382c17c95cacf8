// An in-process transport: ranks are threads of one process that exchange bytes through a shared
// hub. It makes the algorithms testable without MPI or extra processes.
#pragma once

#include <memory>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

// Returns one transport per rank, all connected to the same hub.
std::vector<std::unique_ptr<Transport>> CreateLoopbackTransports(int size);

}  // namespace pycomm
