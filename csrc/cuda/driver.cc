#include "cuda/driver.h"

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

namespace pycomm::cuda {

namespace {

template <typename Fn>
void Fetch(const char* symbol, Fn* fn) {
  cudaDriverEntryPointQueryResult found;
  void* address = nullptr;
  if (cudaGetDriverEntryPointByVersion(symbol, &address, 12000, cudaEnableDefault, &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess) {
    *fn = reinterpret_cast<Fn>(address);
  } else {
    cudaGetLastError();
  }
}

}  // namespace

const Driver& Driver::Get() {
  static const Driver driver = [] {
    Driver d;
    Fetch("cuPointerGetAttributes", &d.get_attributes);
    Fetch("cuMemGetAddressRange", &d.get_address_range);
    Fetch("cuCtxGetCurrent", &d.get_current_context);
    Fetch("cuCtxSetCurrent", &d.set_current_context);
    return d;
  }();
  return driver;
}

DeviceGuard::DeviceGuard(int device) { Enter(device); }

DeviceGuard::DeviceGuard(int device, std::exception_ptr* failure) {
  try {
    Enter(device);
  } catch (...) {
    *failure = std::current_exception();
  }
}

void DeviceGuard::Enter(int device) {
  Check(cudaGetDevice(&previous_device_), "cudaGetDevice");
  const Driver& driver = Driver::Get();
  exact_ = driver.get_current_context && driver.set_current_context &&
           driver.get_current_context(&previous_context_) == CUDA_SUCCESS;
  // With no context current, cudaGetDevice says 0 whatever the thread goes on to use.
  if (previous_device_ == device && (previous_context_ || !exact_)) return;
  Check(cudaSetDevice(device), "cudaSetDevice");
  switched_ = true;
}

DeviceGuard::~DeviceGuard() {
  if (!switched_) return;
  if (exact_) {
    Driver::Get().set_current_context(previous_context_);
  } else if (cudaSetDevice(previous_device_) != cudaSuccess) {
    cudaGetLastError();  // left set, the next kernel launch would be blamed for it
  }
}

}  // namespace pycomm::cuda
