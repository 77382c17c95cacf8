// The few CUDA driver calls pycomm makes, fetched through the runtime so that pycomm never links
// libcuda.so (`import pycomm` must work on machines with no driver), and the device guard that
// needs them.
#pragma once

#include <cuda.h>

#include <exception>

namespace pycomm::cuda {

struct Driver {
  decltype(&cuPointerGetAttributes) get_attributes = nullptr;
  decltype(&cuMemGetAddressRange) get_address_range = nullptr;
  decltype(&cuCtxGetCurrent) get_current_context = nullptr;
  decltype(&cuCtxSetCurrent) set_current_context = nullptr;

  // Entry points the driver lacks stay null.
  static const Driver& Get();
};

// Makes `device` current for the lifetime of the guard, then gives the caller back the context
// it had: none, if it had none. Setting "the device it had" instead would create that device's
// primary context (hundreds of MB; GPU 0 for a thread that never chose one) in every rank.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  // The same, except that a failure to make `device` current goes to *failure instead of being
  // thrown: the guard then leaves the context as it is (for destructors, and for callers that
  // must still tell their peers).
  DeviceGuard(int device, std::exception_ptr* failure);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  void Enter(int device);

  bool switched_ = false;
  bool exact_ = false;  // previous_context_ is known (the driver has the context entry points)
  CUcontext previous_context_ = nullptr;
  int previous_device_ = 0;
};

}  // namespace pycomm::cuda
