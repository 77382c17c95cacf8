#include "cuda/scratch.h"

#include "cuda/cuda_check.h"

namespace pycomm::cuda {

namespace {

constexpr size_t kAlign = 256;

void Free(Memory kind, void* ptr) {
  if (kind == Memory::kDevice) {
    cudaFree(ptr);
  } else {
    cudaFreeHost(ptr);
  }
}

}  // namespace

Scratch::~Scratch() { Release(); }

void Scratch::Release() {
  if (ptr_) Free(kind_, ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

char* Scratch::Reserve(size_t bytes, char** superseded) {
  if (superseded) *superseded = nullptr;
  if (bytes <= bytes_ && ptr_) return ptr_;
  if (ptr_ && !superseded) {  // freed first: the new buffer may need its memory
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    Release();
  }
  const size_t grown = (bytes + bytes / 2 + kAlign - 1) / kAlign * kAlign;
  void* p = nullptr;
  if (kind_ == Memory::kDevice) {
    Check(cudaMalloc(&p, grown), "cudaMalloc(scratch)");
  } else {
    Check(cudaMallocHost(&p, grown), "cudaMallocHost(staging)");
  }
  if (superseded) *superseded = ptr_;
  ptr_ = static_cast<char*>(p);
  bytes_ = grown;
  return ptr_;
}

}  // namespace pycomm::cuda
