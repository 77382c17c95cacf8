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

// Makes `device` current for the lifetime of the guard, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    Check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) Check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace pycomm::cuda
