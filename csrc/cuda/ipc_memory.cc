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
  RetireOverlapping(static_cast<uintptr_t>(base), size);  // freed: this allocation took their place
  cudaIpcMemHandle_t handle;
  if (cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)) != cudaSuccess) {
    cudaGetLastError();  // pool memory cannot be exported: not an error for the caller
    return false;
  }
  by_base_[static_cast<uintptr_t>(base)] = Entry{buffer_id, size, handle};
  out->handle = handle;
  return true;
}

void IpcExporter::RetireOverlapping(uintptr_t base, size_t size) {
  auto it = by_base_.lower_bound(base);
  if (it != by_base_.begin()) {
    auto before = std::prev(it);
    if (before->first + before->second.size > base) it = before;
  }
  while (it != by_base_.end() && it->first < base + size) {
    retired_.push_front(it->second.handle);
    it = by_base_.erase(it);
  }
}

bool IpcExporter::Retire(const void* base, cudaIpcMemHandle_t* handle) {
  auto it = by_base_.find(reinterpret_cast<uintptr_t>(base));
  if (it == by_base_.end()) return false;
  *handle = it->second.handle;
  retired_.push_back(it->second.handle);
  by_base_.erase(it);
  return true;
}

void IpcExporter::Sweep() {
  if (by_base_.empty()) return;
  auto it = by_base_.lower_bound(sweep_from_);
  if (it == by_base_.end()) it = by_base_.begin();
  sweep_from_ = it->first + 1;
  CUdeviceptr base = 0;
  unsigned long long buffer_id = 0;
  CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_BUFFER_ID};
  void* values[] = {&base, &buffer_id};
  const Driver& driver = Driver::Get();
  const bool live = driver.get_attributes(2, attributes, values, static_cast<CUdeviceptr>(it->first)) == CUDA_SUCCESS &&
                    static_cast<uintptr_t>(base) == it->first && buffer_id == it->second.buffer_id;
  if (live) return;
  retired_.push_back(it->second.handle);
  by_base_.erase(it);
}

std::vector<cudaIpcMemHandle_t> IpcExporter::TakeRetired(size_t most) {
  std::vector<cudaIpcMemHandle_t> taken;
  while (!retired_.empty() && taken.size() < most) {
    taken.push_back(retired_.front());
    retired_.pop_front();
  }
  return taken;
}

void IpcExporter::Requeue(const std::vector<cudaIpcMemHandle_t>& handles) {
  retired_.insert(retired_.begin(), handles.begin(), handles.end());
}

void IpcImporter::Unmap(std::map<std::string, Mapping>::iterator it) {
  cudaIpcCloseMemHandle(it->second.base);
  order_.erase(it->second.use);
  mapped_.erase(it);
}

void IpcImporter::Close(const cudaIpcMemHandle_t* handles, int count) {
  bool synced = false;
  for (int i = 0; i < count; ++i) {
    auto it = mapped_.find(Key(handles[i]));
    if (it == mapped_.end()) continue;
    if (!synced) Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    synced = true;
    Unmap(it);
  }
}

bool IpcImporter::CloseStale(int peer) {
  std::vector<std::map<std::string, Mapping>::iterator> stale;
  for (auto it = mapped_.begin(); it != mapped_.end(); ++it) {
    if (it->second.peer == peer && it->second.call != call_) stale.push_back(it);
  }
  if (stale.empty()) return false;
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  for (auto it : stale) Unmap(it);
  return true;
}

void IpcImporter::CloseAll() {
  for (auto& entry : mapped_) cudaIpcCloseMemHandle(entry.second.base);
  mapped_.clear();
  order_.clear();
}

void* IpcImporter::Open(const IpcBuffer& buffer, int peer) {
  const std::string key = Key(buffer.handle);
  auto it = mapped_.find(key);
  if (it != mapped_.end()) {
    order_.splice(order_.end(), order_, it->second.use);
    it->second.call = call_;
    return static_cast<char*>(it->second.base) + buffer.offset;
  }
  if (mapped_.size() >= kMaxMappings) {
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    Unmap(mapped_.find(order_.front()));
  }
  void* base = nullptr;
  cudaError_t err = cudaIpcOpenMemHandle(&base, buffer.handle, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (CloseStale(peer)) err = cudaIpcOpenMemHandle(&base, buffer.handle, cudaIpcMemLazyEnablePeerAccess);
  }
  Check(err, "cudaIpcOpenMemHandle");
  order_.push_back(key);
  mapped_.emplace(key, Mapping{base, std::prev(order_.end()), peer, call_});
  return static_cast<char*>(base) + buffer.offset;
}

}  // namespace pycomm::cuda
