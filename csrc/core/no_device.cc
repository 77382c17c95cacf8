// Linked instead of csrc/cuda when pycomm is built without CUDA.
#include "core/device.h"

namespace pycomm {

bool BuiltWithCuda() { return false; }

int DeviceOfPointer(const void*) {
  throw CommError("pycomm: this build has no CUDA support (rebuild with a CUDA compiler and PYCOMM_CUDA=ON)");
}

std::shared_ptr<void> UseDevice(int) {
  throw CommError("pycomm: this build has no CUDA support (rebuild with a CUDA compiler and PYCOMM_CUDA=ON)");
}

void OrderAfterStream(const void*, void*, void*) {
  throw CommError("pycomm: this build has no CUDA support (rebuild with a CUDA compiler and PYCOMM_CUDA=ON)");
}

std::unique_ptr<DeviceCollectives> CreateDeviceCollectives(Transport&, uint64_t*, Hierarchy*, int, const Options&) {
  throw CommError("pycomm: this build has no CUDA support (rebuild with a CUDA compiler and PYCOMM_CUDA=ON)");
}

}  // namespace pycomm
