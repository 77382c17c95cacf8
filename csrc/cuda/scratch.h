// Device and pinned host buffers that grow on demand and are reused from call to call.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace pycomm::cuda {

enum class Memory { kDevice, kPinnedHost };

class Scratch {
 public:
  explicit Scratch(Memory kind) : kind_(kind) {}
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // At least `bytes`, grown by half again so that slowly growing sizes do not reallocate each
  // call. Growing waits for the device first: queued work may still use the old buffer. With
  // `superseded`, the old buffer (null if none) is the caller's to free instead, when it can.
  char* Reserve(size_t bytes, char** superseded = nullptr);
  char* get() const { return ptr_; }
  // Frees the buffer now (the destructor does otherwise), in the current context.
  void Release();

 private:
  Memory kind_;
  char* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace pycomm::cuda
