// Linked instead of csrc/cuda when pycomm is built without CUDA.
#include "core/device.h"

namespace pycomm {

namespace {
[[noreturn]] void NoCuda() {
  throw CommError("pycomm: this build has no CUDA support (rebuild with a CUDA compiler and PYCOMM_CUDA=ON)");
}
}  // namespace

bool BuiltWithCuda() { return false; }

int DeviceOfPointer(const void*) { NoCuda(); }

std::shared_ptr<void> UseDevice(int) { NoCuda(); }

void OrderAfterStream(const void*, void*, void*) { NoCuda(); }

std::unique_ptr<DeviceCollectives> CreateDeviceCollectives(Transport&, uint64_t*, Hierarchy*, int, const Options&) {
  NoCuda();
}

}  // namespace pycomm
