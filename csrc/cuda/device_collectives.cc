// Device collectives for ranks that share a node: each call hands every rank's buffers to the
// leader of a DeviceGroup, which does the whole collective in one pass over GPU memory (see
// device_group.h for why and how the ranks are ordered).

#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "core/device.h"
#include "cuda/cuda_check.h"
#include "cuda/device_group.h"
#include "cuda/reduce_kernels.h"

namespace pycomm {

bool BuiltWithCuda() { return true; }

namespace {

char* At(void* base, size_t offset) { return static_cast<char*>(base) + offset; }

// PYCOMM_GPU_SYNC=host|stream chooses how ranks order their GPU work (see DeviceSync). Host is
// the default: measured on an H200 shared by 2 ranks, stream waits across processes cost a
// context switch (~140 us) per rank and call, host sync 35 us per call in all
// (bench/results/2026-11-27-h200-gpu.md).
cuda::DeviceSync SyncFromEnvironment() {
  const char* value = std::getenv("PYCOMM_GPU_SYNC");
  if (!value || !*value || std::string(value) == "host") return cuda::DeviceSync::kHost;
  if (std::string(value) == "stream") return cuda::DeviceSync::kStream;
  throw std::invalid_argument(std::string("pycomm: PYCOMM_GPU_SYNC must be stream or host, got ") + value);
}

class LeaderCollectives : public DeviceCollectives {
 public:
  LeaderCollectives(Transport& transport, int device, double timeout_s)
      : size_(transport.size()), rank_(transport.rank()), group_(transport, device, timeout_s, SyncFromEnvironment()) {}

  int device() const override { return group_.device(); }

  void Quiesce() override { group_.Quiesce(); }

  void Allreduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op, void* stream) override {
    const size_t bytes = count * DataTypeSize(dtype);
    // In place the two refs name the same memory; they stay two so that every rank passes the
    // same number of buffers.
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), bytes, true, false}, {recv, bytes, false, true}};
    group_.Run(buffers, Stream(stream), [&](const std::vector<std::vector<void*>>& ptrs, cudaStream_t s) {
      std::vector<const void*> inputs;
      std::vector<void*> outputs;
      for (const auto& rank : ptrs) {
        inputs.push_back(rank[0]);
        outputs.push_back(rank[1]);
      }
      if (count) Reduce(inputs, outputs, count, dtype, op, s);
    });
  }

  void ReduceScatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                     void* stream) override {
    const size_t block = recv_count * DataTypeSize(dtype);
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), block * size_, true, false},
                                            {recv, block, false, true}};
    group_.Run(buffers, Stream(stream), [&](const std::vector<std::vector<void*>>& ptrs, cudaStream_t s) {
      if (!recv_count) return;
      for (int owner = 0; owner < size_; ++owner) {
        std::vector<const void*> inputs;
        for (const auto& rank : ptrs) inputs.push_back(At(rank[0], owner * block));
        Reduce(inputs, {ptrs[owner][1]}, recv_count, dtype, op, s);
      }
    });
  }

  void Allgather(const void* send, void* recv, size_t send_count, DataType dtype, void* stream) override {
    const size_t block = send_count * DataTypeSize(dtype);
    std::vector<cuda::BufferRef> buffers = {{const_cast<void*>(send), block, true, false},
                                            {recv, block * size_, false, true}};
    group_.Run(buffers, Stream(stream), [&](const std::vector<std::vector<void*>>& ptrs, cudaStream_t s) {
      if (!block) return;
      for (int to = 0; to < size_; ++to) {
        for (int from = 0; from < size_; ++from) {
          if (ptrs[from][0] == At(ptrs[to][1], from * block)) continue;  // in place
          cuda::Check(cudaMemcpyAsync(At(ptrs[to][1], from * block), ptrs[from][0], block, cudaMemcpyDeviceToDevice, s),
                      "cudaMemcpyAsync(allgather)");
        }
      }
    });
  }

  void Broadcast(void* buf, size_t count, DataType dtype, int root, void* stream) override {
    const size_t bytes = count * DataTypeSize(dtype);
    const bool is_root = rank_ == root;
    std::vector<cuda::BufferRef> buffers = {{buf, bytes, is_root, !is_root}};
    group_.Run(buffers, Stream(stream), [&](const std::vector<std::vector<void*>>& ptrs, cudaStream_t s) {
      if (!bytes) return;
      for (int to = 0; to < size_; ++to) {
        if (to == root) continue;
        cuda::Check(cudaMemcpyAsync(ptrs[to][0], ptrs[root][0], bytes, cudaMemcpyDeviceToDevice, s),
                    "cudaMemcpyAsync(broadcast)");
      }
    });
  }

 private:
  static cudaStream_t Stream(void* stream) { return static_cast<cudaStream_t>(stream); }

  void Reduce(const std::vector<const void*>& inputs, const std::vector<void*>& outputs, size_t count, DataType dtype,
              ReduceOp op, cudaStream_t s) {
    cuda::Check(cuda::LaunchReduce(inputs.data(), static_cast<int>(inputs.size()), outputs.data(),
                                   static_cast<int>(outputs.size()), count, dtype, op, size_, s),
                "reduction kernel launch");
  }

  int size_;
  int rank_;
  cuda::DeviceGroup group_;
};

}  // namespace

std::unique_ptr<DeviceCollectives> CreateDeviceCollectives(Transport& transport, int device, double timeout_s) {
  // Checked on every rank, before any exchange, so that all fail alike.
  if (transport.size() > cuda::kMaxReduceInputs) {
    throw CommError("pycomm: device arrays support at most " + std::to_string(cuda::kMaxReduceInputs) +
                    " ranks for now, not " + std::to_string(transport.size()));
  }
  if (transport.local_size() != transport.size()) {
    throw CommError("pycomm: device arrays need every rank on one node for now (" +
                    std::to_string(transport.local_size()) + " of " + std::to_string(transport.size()) +
                    " ranks are on this node)");
  }
  return std::make_unique<LeaderCollectives>(transport, device, timeout_s);
}

}  // namespace pycomm
