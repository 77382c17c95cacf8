// CUDA IPC registrations, cached on both sides. An exported handle covers a whole allocation, so a
// buffer travels as (handle of its allocation, offset); the importer maps each allocation once.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <string>

namespace pycomm::cuda {

// What a rank sends so that a peer can reach one of its device buffers.
struct IpcBuffer {
  cudaIpcMemHandle_t handle;
  uint64_t offset;  // of the buffer inside the exported allocation
};

// Exports this process's allocations. Memory that cannot be exported (stream-ordered pools,
// cudaMallocAsync) is reported as such, so the caller can stage it through exportable memory.
class IpcExporter {
 public:
  // Returns false when `ptr`'s allocation cannot be exported.
  bool Export(const void* ptr, IpcBuffer* out);

 private:
  struct Entry {
    unsigned long long buffer_id;  // tells a reused address from the allocation cached for it
    size_t size;
    cudaIpcMemHandle_t handle;
  };
  std::map<uintptr_t, Entry> by_base_;
};

// Maps peers' allocations into this process; keeps at most kMaxMappings, closing the least
// recently used (after waiting for the device: queued work may still read it). A call maps far
// fewer buffers than that, so it never closes one it has just opened or looked up.
class IpcImporter {
 public:
  ~IpcImporter() { CloseAll(); }
  // The address of the peer's buffer in this process.
  void* Open(const IpcBuffer& buffer);
  // Unmaps every buffer (no queued work may read them any more).
  void CloseAll();

 private:
  static constexpr size_t kMaxMappings = 512;
  struct Mapping {
    void* base;
    std::list<std::string>::iterator use;  // its place in order_
  };
  std::map<std::string, Mapping> mapped_;  // key: the handle's bytes
  std::list<std::string> order_;           // least recently used first
};

}  // namespace pycomm::cuda
