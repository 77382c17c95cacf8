// Turns CUDA runtime errors into pycomm::CommError, naming the call that failed.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "pycomm/pycomm.h"

namespace pycomm::cuda {

inline void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state so later calls are not blamed
    throw CommError(std::string("pycomm: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace pycomm::cuda
