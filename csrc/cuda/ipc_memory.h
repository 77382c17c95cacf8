// CUDA IPC registrations, cached on both sides. An exported handle covers a whole allocation, so a
// buffer travels as (handle of its allocation, offset); the importer maps each allocation once.
// An allocation that its owner frees is retired: the owner sends its handle with a later call,
// and the importers close their mappings of it, so that the driver gets the memory back then
// instead of when the communicator closes.
#pragma once

#include <cuda_runtime.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

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
  // Returns false when `ptr`'s allocation cannot be exported. Cached allocations found freed
  // (another now overlaps their addresses) are retired first in line: importers must close them
  // before they can map the new one (CUDA refuses a mapping over one still open).
  bool Export(const void* ptr, IpcBuffer* out);
  // Retires the export of the allocation at `base`, which its owner is about to free: returns
  // its handle, or false where it was never exported.
  bool Retire(const void* base, cudaIpcMemHandle_t* handle);
  // Checks one cached export, in turn, for an allocation freed since (one driver call): the
  // owner's frees are seen without being told of them.
  void Sweep();
  // Up to `most` retired handles, oldest first, to send to the importers; Requeue puts back
  // those whose sending failed.
  std::vector<cudaIpcMemHandle_t> TakeRetired(size_t most);
  void Requeue(const std::vector<cudaIpcMemHandle_t>& handles);

 private:
  struct Entry {
    unsigned long long buffer_id;  // tells a reused address from the allocation cached for it
    size_t size;
    cudaIpcMemHandle_t handle;
  };
  // Retires the cached allocations that overlap [base, base + size), first in line.
  void RetireOverlapping(uintptr_t base, size_t size);
  // Remembers that `buffer_id`'s allocation cannot be exported; returns false (Export's answer).
  bool Refuse(unsigned long long buffer_id);

  std::map<uintptr_t, Entry> by_base_;
  // Allocations CUDA would not export (stream-ordered pools), by id (never reused): asked about
  // once, not on every call. Forgotten wholesale past kMaxRefused.
  std::unordered_set<unsigned long long> refused_;
  static constexpr size_t kMaxRefused = 4096;
  std::deque<cudaIpcMemHandle_t> retired_;
  uintptr_t sweep_from_ = 0;  // the base Sweep checks next (the first at or above it)
};

// Maps peers' allocations into this process, once per CUDA context: every group (communicator)
// of the process on that GPU shares one importer. CUDA maps an allocation once per context and
// refuses a mapping over the addresses of one still mapped, so a stale mapping that one
// communicator keeps (its owner freed the allocation; the retirement goes to that communicator's
// next call) would otherwise block another communicator's mapping of the new allocation for good.
// Groups run their calls on threads of their own: the importer's state is under one lock, which
// is never held while waiting for the device (one group's wait would hold up every group's calls).
//
// Keeps at most kMaxMappings, closing the least recently used first. Closing takes mappings out
// of the cache first, then waits for the device (queued work may still read them), then unmaps:
// a group that maps the same allocation meanwhile gets a mapping of its own (CUDA counts the
// opens). A mapping that a call in progress (Imports) opened or looked up is never closed under it.
class IpcImporter {
 public:
  // The importer of the context current on this thread (made where there is none yet).
  static std::shared_ptr<IpcImporter> OfCurrentContext();
  ~IpcImporter();
  IpcImporter(const IpcImporter&) = delete;
  IpcImporter& operator=(const IpcImporter&) = delete;

  // One call's mappings, by one group (`user`): pinned until Done (or the end of the scope),
  // which the call reaches once the work that reads them is queued.
  class Imports {
   public:
    Imports(IpcImporter& importer, const void* user) : importer_(importer), user_(user) {}
    ~Imports() { Done(); }
    Imports(const Imports&) = delete;
    Imports& operator=(const Imports&) = delete;
    // The address of a peer's buffer in this process. Where CUDA refuses to map it (most likely
    // because a mapping of a freed allocation of the peer's, whose retirement has not arrived,
    // overlaps it), every mapping that no call in progress uses is closed and the mapping is
    // tried once more.
    void* Open(const IpcBuffer& buffer);
    // The call's work is queued: its mappings may be closed from now on (after a wait for the
    // device, as any).
    void Done();

   private:
    IpcImporter& importer_;
    const void* user_;
    std::vector<std::string> pinned_;  // keys
  };

  // Maps `buffer` for `user` outside any call (set-up's probe): mapped like any other.
  void Open(const IpcBuffer& buffer, const void* user);
  // Unmaps the retired allocations among `handles` that are mapped, after waiting for the device
  // (once, and only where one is): queued work may still read them after a call failed midway.
  // One that a call in progress uses stays (only a peer that freed a buffer under a call could
  // make that), for the usual ways of closing.
  void Close(const cudaIpcMemHandle_t* handles, int count);
  // `user` maps nothing from now on: unmaps what no other group maps. Its own queued work must
  // no longer read them (it does not wait for the device).
  void Release(const void* user);

 private:
  IpcImporter() = default;
  static constexpr size_t kMaxMappings = 512;
  static std::string Key(const cudaIpcMemHandle_t& handle) {
    return std::string(reinterpret_cast<const char*>(&handle), sizeof handle);
  }
  struct Mapping {
    void* base;
    std::list<std::string>::iterator use;  // its place in order_
    std::vector<const void*> users;        // the groups that opened it
    int pins = 0;                          // calls in progress that use it
  };
  using Entry = std::map<std::string, Mapping>::iterator;
  // `pin`: for a call in progress.
  void* Open(const IpcBuffer& buffer, const void* user, bool pin);
  // Takes a mapping out of the cache (under mutex_): returns its base, for Unmap.
  void* Take(Entry it);
  // Takes out every mapping that no call in progress uses.
  std::vector<void*> TakeUnpinned();
  // Waits for the device, then unmaps `bases`, with `lock` (on mutex_) released meanwhile.
  void Unmap(std::unique_lock<std::mutex>& lock, const std::vector<void*>& bases, bool wait_for_device);

  std::mutex mutex_;
  // Unmaps in progress (taken out of the cache, not yet closed), and their ends: a refused
  // mapping may be another thread's to close.
  int unmapping_ = 0;
  std::condition_variable unmapped_;
  std::map<std::string, Mapping> mapped_;  // key: the handle's bytes
  std::list<std::string> order_;           // least recently used first
};

}  // namespace pycomm::cuda
