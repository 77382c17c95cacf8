#include "cuda/ipc_memory.h"

#include <cstring>
#include <iterator>

#include "cuda/cuda_check.h"
#include "cuda/driver.h"

namespace pycomm::cuda {

bool IpcExporter::Export(const void* ptr, IpcBuffer* out) {
  const Driver& driver = Driver::Get();
  if (!driver.get_attributes) throw CommError("pycomm: CUDA driver entry point cuPointerGetAttributes missing");
  // One driver call per buffer and call: this runs on every collective's critical path.
  CUdeviceptr base = 0;
  size_t size = 0;
  unsigned long long buffer_id = 0;
  CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                      CU_POINTER_ATTRIBUTE_BUFFER_ID};
  void* values[] = {&base, &size, &buffer_id};
  if (driver.get_attributes(3, attributes, values, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS || !base) {
    return false;
  }
  out->offset = reinterpret_cast<uintptr_t>(ptr) - static_cast<uintptr_t>(base);
  auto it = by_base_.find(static_cast<uintptr_t>(base));
  if (it != by_base_.end() && it->second.buffer_id == buffer_id && it->second.size == size) {
    out->handle = it->second.handle;
    return true;
  }
  cudaIpcMemHandle_t handle;
  if (cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)) != cudaSuccess) {
    cudaGetLastError();  // pool memory cannot be exported: not an error for the caller
    return false;
  }
  by_base_[static_cast<uintptr_t>(base)] = Entry{buffer_id, size, handle};
  out->handle = handle;
  return true;
}

void IpcImporter::CloseAll() {
  for (auto& entry : mapped_) cudaIpcCloseMemHandle(entry.second.base);
  mapped_.clear();
  order_.clear();
}

void* IpcImporter::Open(const IpcBuffer& buffer) {
  std::string key(reinterpret_cast<const char*>(&buffer.handle), sizeof buffer.handle);
  auto it = mapped_.find(key);
  if (it != mapped_.end()) {
    order_.splice(order_.end(), order_, it->second.use);
    return static_cast<char*>(it->second.base) + buffer.offset;
  }
  if (mapped_.size() >= kMaxMappings) {
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cudaIpcCloseMemHandle(mapped_.at(order_.front()).base);
    mapped_.erase(order_.front());
    order_.pop_front();
  }
  void* base = nullptr;
  Check(cudaIpcOpenMemHandle(&base, buffer.handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  order_.push_back(key);
  mapped_.emplace(key, Mapping{base, std::prev(order_.end())});
  return static_cast<char*>(base) + buffer.offset;
}

}  // namespace pycomm::cuda
