#include "cuda/ipc_memory.h"

#include <algorithm>
#include <cstring>
#include <iterator>

#include "cuda/cuda_check.h"
#include "cuda/driver.h"

namespace pycomm::cuda {

namespace {

// The driver's id of the allocation holding `p`: unique in the process for its life, never
// reused; 0 where `p` is not device memory.
unsigned long long BufferId(const Driver& driver, uintptr_t p) {
  unsigned long long id = 0;
  CUpointer_attribute attribute = CU_POINTER_ATTRIBUTE_BUFFER_ID;
  void* value = &id;
  if (driver.get_attributes(1, &attribute, &value, static_cast<CUdeviceptr>(p)) != CUDA_SUCCESS) return 0;
  return id;
}

}  // namespace

bool IpcExporter::Export(const void* ptr, IpcBuffer* out) {
  const Driver& driver = Driver::Get();
  if (!driver.get_attributes || !driver.get_address_range) {
    throw CommError("pycomm: CUDA driver entry points cuPointerGetAttributes / cuMemGetAddressRange missing");
  }
  // One driver call per buffer and call (this runs on every collective's critical path): the
  // allocation's id, to find it among the cached ones, or the refused.
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  const unsigned long long buffer_id = BufferId(driver, p);
  if (!buffer_id || refused_.count(buffer_id)) return false;
  auto it = by_base_.upper_bound(p);
  if (it != by_base_.begin()) {
    --it;
    if (p < it->first + it->second.size && it->second.buffer_id == buffer_id) {
      out->handle = it->second.handle;
      out->offset = p - it->first;
      return true;
    }
  }
  // A new allocation: its bounds from cuMemGetAddressRange, not from the pointer attributes
  // RANGE_START_ADDR / RANGE_SIZE, which the driver documents as the mappable range the pointer
  // lies in, not necessarily the allocation (cudaMalloc packs small allocations together).
  CUdeviceptr base = 0;
  size_t size = 0;
  cudaIpcMemHandle_t handle;
  if (driver.get_address_range(&base, &size, static_cast<CUdeviceptr>(p)) != CUDA_SUCCESS || !base) {
    return Refuse(buffer_id);
  }
  RetireOverlapping(static_cast<uintptr_t>(base), size);  // freed: this allocation took their place
  const cudaError_t err = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base));
  if (err != cudaSuccess) {
    cudaGetLastError();  // pool memory cannot be exported: not an error for the caller
    // Memory CUDA cannot export stays so; another failure (out of memory, say) may pass next time.
    return err == cudaErrorInvalidValue || err == cudaErrorNotSupported ? Refuse(buffer_id) : false;
  }
  by_base_[static_cast<uintptr_t>(base)] = Entry{buffer_id, size, handle};
  out->handle = handle;
  out->offset = p - static_cast<uintptr_t>(base);
  return true;
}

bool IpcExporter::Refuse(unsigned long long buffer_id) {
  if (refused_.size() >= kMaxRefused) refused_.clear();
  refused_.insert(buffer_id);
  return false;
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
  // Its base still lies in the allocation cached for it (ids are never reused).
  if (BufferId(Driver::Get(), it->first) == it->second.buffer_id) return;
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

std::shared_ptr<IpcImporter> IpcImporter::OfCurrentContext() {
  // Keyed by the context where the driver says which is current, else by the device (the
  // runtime then uses its primary context).
  CUcontext context = nullptr;
  const Driver& driver = Driver::Get();
  if (!driver.get_current_context || driver.get_current_context(&context) != CUDA_SUCCESS) context = nullptr;
  int device = -1;
  if (!context) Check(cudaGetDevice(&device), "cudaGetDevice");
  static std::mutex registry_mutex;
  static std::map<std::pair<CUcontext, int>, std::weak_ptr<IpcImporter>> registry;
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (auto it = registry.begin(); it != registry.end();) {  // contexts no group uses any more
    it = it->second.expired() ? registry.erase(it) : std::next(it);
  }
  std::weak_ptr<IpcImporter>& entry = registry[{context, device}];
  std::shared_ptr<IpcImporter> importer = entry.lock();
  if (!importer) {
    importer.reset(new IpcImporter());  // the constructor is private
    entry = importer;
  }
  return importer;
}

IpcImporter::~IpcImporter() {
  for (auto& entry : mapped_) {
    if (cudaIpcCloseMemHandle(entry.second.base) != cudaSuccess) cudaGetLastError();
  }
}

void IpcImporter::Imports::Done() {
  std::lock_guard<std::mutex> lock(importer_.mutex_);
  for (const std::string& key : pinned_) {
    auto it = importer_.mapped_.find(key);
    if (it != importer_.mapped_.end()) --it->second.pins;
  }
  pinned_.clear();
}

void* IpcImporter::Imports::Open(const IpcBuffer& buffer) {
  void* at = importer_.Open(buffer, user_, true);
  pinned_.push_back(Key(buffer.handle));
  return at;
}

void IpcImporter::Open(const IpcBuffer& buffer, const void* user) { Open(buffer, user, false); }

void* IpcImporter::Open(const IpcBuffer& buffer, const void* user, bool pin) {
  const std::string key = Key(buffer.handle);
  std::unique_lock<std::mutex> lock(mutex_);
  auto it = mapped_.find(key);
  if (it == mapped_.end()) {
    if (mapped_.size() >= kMaxMappings) {
      for (const std::string& oldest : order_) {
        auto old = mapped_.find(oldest);
        if (old->second.pins > 0) continue;
        Unmap(lock, {Take(old)}, true);
        break;
      }
    }
    void* base = nullptr;
    cudaError_t err = cudaIpcOpenMemHandle(&base, buffer.handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();
      const std::vector<void*> unpinned = TakeUnpinned();
      const bool others_unmapping = unmapping_ > 0;
      Unmap(lock, unpinned, true);
      unmapped_.wait(lock, [this] { return unmapping_ == 0; });  // what other threads took out is closed
      if (!unpinned.empty() || others_unmapping) {
        err = cudaIpcOpenMemHandle(&base, buffer.handle, cudaIpcMemLazyEnablePeerAccess);
      }
    }
    Check(err, "cudaIpcOpenMemHandle");
    it = mapped_.find(key);  // another group may have mapped it while the lock was released
    if (it != mapped_.end()) {
      if (cudaIpcCloseMemHandle(base) != cudaSuccess) cudaGetLastError();  // CUDA counted both opens
    } else {
      order_.push_back(key);
      it = mapped_.emplace(key, Mapping{base, std::prev(order_.end()), {}, 0}).first;
    }
  }
  order_.splice(order_.end(), order_, it->second.use);
  Mapping& mapping = it->second;
  if (std::find(mapping.users.begin(), mapping.users.end(), user) == mapping.users.end()) {
    mapping.users.push_back(user);
  }
  if (pin) ++mapping.pins;
  return static_cast<char*>(mapping.base) + buffer.offset;
}

void* IpcImporter::Take(Entry it) {
  void* base = it->second.base;
  order_.erase(it->second.use);
  mapped_.erase(it);
  return base;
}

std::vector<void*> IpcImporter::TakeUnpinned() {
  std::vector<void*> bases;
  for (auto it = mapped_.begin(); it != mapped_.end();) {
    auto next = std::next(it);
    if (it->second.pins == 0) bases.push_back(Take(it));
    it = next;
  }
  return bases;
}

void IpcImporter::Unmap(std::unique_lock<std::mutex>& lock, const std::vector<void*>& bases, bool wait_for_device) {
  if (bases.empty()) return;
  ++unmapping_;
  lock.unlock();
  cudaError_t waited = wait_for_device ? cudaDeviceSynchronize() : cudaSuccess;
  for (void* base : bases) {
    if (waited == cudaSuccess && cudaIpcCloseMemHandle(base) != cudaSuccess) cudaGetLastError();  // not the caller's
  }
  lock.lock();
  --unmapping_;
  unmapped_.notify_all();
  Check(waited, "cudaDeviceSynchronize");
}

void IpcImporter::Close(const cudaIpcMemHandle_t* handles, int count) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::vector<void*> retired;
  for (int i = 0; i < count; ++i) {
    auto it = mapped_.find(Key(handles[i]));
    if (it != mapped_.end() && it->second.pins == 0) retired.push_back(Take(it));
  }
  Unmap(lock, retired, true);
}

void IpcImporter::Release(const void* user) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::vector<void*> unused;
  for (auto it = mapped_.begin(); it != mapped_.end();) {
    auto next = std::next(it);
    auto& users = it->second.users;
    users.erase(std::remove(users.begin(), users.end(), user), users.end());
    if (users.empty() && it->second.pins == 0) unused.push_back(Take(it));
    it = next;
  }
  Unmap(lock, unused, false);
}

}  // namespace pycomm::cuda
