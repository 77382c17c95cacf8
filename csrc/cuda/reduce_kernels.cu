#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/reduce_kernels.h"

namespace pycomm::cuda {

namespace {

struct Inputs {
  const void* ptr[kMaxReduceInputs];
};
struct Outputs {
  void* ptr[kMaxReduceOutputs];
};

// How one dtype is loaded into, and stored from, the type its arithmetic runs in.
template <typename T>
struct Native {
  using Storage = T;
  using Compute = T;
  __device__ static T Load(T v) { return v; }
  __device__ static T Store(T v) { return v; }
};
struct Half {
  using Storage = __half;
  using Compute = float;
  __device__ static float Load(__half v) { return __half2float(v); }
  __device__ static __half Store(float v) { return __float2half_rn(v); }
};
struct BFloat16 {
  using Storage = __nv_bfloat16;
  using Compute = float;
  __device__ static float Load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 Store(float v) { return __float2bfloat16_rn(v); }
};

// Integer sums and products wrap, as on the CPU and in numpy: unsigned arithmetic keeps that defined.
template <typename T>
__device__ T WrapAdd(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}
template <typename T>
__device__ T WrapMul(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
  } else {
    return a * b;
  }
}

template <ReduceOp Op, typename T>
__device__ T Apply(T a, T b) {
  if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) return WrapAdd(a, b);
  if constexpr (Op == ReduceOp::kProd) return WrapMul(a, b);
  if constexpr (Op == ReduceOp::kMin) return b < a ? b : a;
  if constexpr (Op == ReduceOp::kMax) return a < b ? b : a;
}

template <typename Type, ReduceOp Op>
__device__ typename Type::Storage ReduceOne(const Inputs& in, int num_inputs, size_t i, int divisor) {
  using S = typename Type::Storage;
  using C = typename Type::Compute;
  C acc = Type::Load(static_cast<const S*>(in.ptr[0])[i]);
#pragma unroll
  for (int k = 1; k < kMaxReduceInputs; ++k) {
    if (k < num_inputs) acc = Apply<Op>(acc, Type::Load(static_cast<const S*>(in.ptr[k])[i]));
  }
  if constexpr (Op == ReduceOp::kAvg) acc = acc / static_cast<C>(divisor);
  return Type::Store(acc);
}

// Each thread handles 16-byte vectors: one 16-byte load per input, then the elements inside it.
template <typename Type, ReduceOp Op>
__global__ void ReduceVectorKernel(Inputs in, int num_inputs, Outputs out, int num_outputs, size_t vectors,
                                   int divisor) {
  using S = typename Type::Storage;
  using C = typename Type::Compute;
  constexpr int kPerVector = 16 / sizeof(S);
  union Vec {
    uint4 raw;
    S elem[kPerVector];
  };
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t v = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += stride) {
    Vec loaded[kMaxReduceInputs];
#pragma unroll
    for (int k = 0; k < kMaxReduceInputs; ++k) {
      if (k < num_inputs) loaded[k].raw = static_cast<const uint4*>(in.ptr[k])[v];
    }
    Vec result;
#pragma unroll
    for (int e = 0; e < kPerVector; ++e) {
      C acc = Type::Load(loaded[0].elem[e]);
#pragma unroll
      for (int k = 1; k < kMaxReduceInputs; ++k) {
        if (k < num_inputs) acc = Apply<Op>(acc, Type::Load(loaded[k].elem[e]));
      }
      if constexpr (Op == ReduceOp::kAvg) acc = acc / static_cast<C>(divisor);
      result.elem[e] = Type::Store(acc);
    }
#pragma unroll
    for (int k = 0; k < kMaxReduceOutputs; ++k) {
      if (k < num_outputs) static_cast<uint4*>(out.ptr[k])[v] = result.raw;
    }
  }
}

// Elements before the first 16-byte boundary, or after the last: one element per thread.
template <typename Type, ReduceOp Op>
__global__ void ReduceScalarKernel(Inputs in, int num_inputs, Outputs out, int num_outputs, size_t begin, size_t end,
                                   int divisor) {
  using S = typename Type::Storage;
  size_t i = begin + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= end) return;
  S r = ReduceOne<Type, Op>(in, num_inputs, i, divisor);
  for (int k = 0; k < num_outputs; ++k) static_cast<S*>(out.ptr[k])[i] = r;
}

int GridFor(size_t work, int threads) {
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  static int max_blocks = [] {
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    return sms > 0 ? sms * 8 : 1024;
  }();
  size_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < static_cast<size_t>(max_blocks) ? blocks : max_blocks);
}

template <typename Type, ReduceOp Op>
cudaError_t Launch(const Inputs& in, int num_inputs, const Outputs& out, int num_outputs, size_t n, int divisor,
                   cudaStream_t stream) {
  using S = typename Type::Storage;
  constexpr int kThreads = 256;
  bool aligned = true;
  for (int k = 0; k < num_inputs; ++k) aligned = aligned && reinterpret_cast<uintptr_t>(in.ptr[k]) % 16 == 0;
  for (int k = 0; k < num_outputs; ++k) aligned = aligned && reinterpret_cast<uintptr_t>(out.ptr[k]) % 16 == 0;
  const size_t per_vector = 16 / sizeof(S);
  const size_t vectors = aligned ? n / per_vector : 0;
  if (vectors) {
    ReduceVectorKernel<Type, Op>
        <<<GridFor(vectors, kThreads), kThreads, 0, stream>>>(in, num_inputs, out, num_outputs, vectors, divisor);
  }
  const size_t tail = vectors * per_vector;
  if (tail < n) {
    size_t count = n - tail;
    ReduceScalarKernel<Type, Op><<<static_cast<unsigned>((count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        in, num_inputs, out, num_outputs, tail, n, divisor);
  }
  return cudaGetLastError();
}

template <typename Type>
cudaError_t ForOp(ReduceOp op, const Inputs& in, int num_inputs, const Outputs& out, int num_outputs, size_t n,
                  int divisor, cudaStream_t stream) {
  switch (op) {
    case ReduceOp::kSum:
      return Launch<Type, ReduceOp::kSum>(in, num_inputs, out, num_outputs, n, divisor, stream);
    case ReduceOp::kProd:
      return Launch<Type, ReduceOp::kProd>(in, num_inputs, out, num_outputs, n, divisor, stream);
    case ReduceOp::kMin:
      return Launch<Type, ReduceOp::kMin>(in, num_inputs, out, num_outputs, n, divisor, stream);
    case ReduceOp::kMax:
      return Launch<Type, ReduceOp::kMax>(in, num_inputs, out, num_outputs, n, divisor, stream);
    case ReduceOp::kAvg:
      if constexpr (std::is_floating_point_v<typename Type::Compute>) {
        return Launch<Type, ReduceOp::kAvg>(in, num_inputs, out, num_outputs, n, divisor, stream);
      }
      return cudaErrorInvalidValue;  // avg of integers
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t LaunchReduce(const void* const* inputs, int num_inputs, void* const* outputs, int num_outputs, size_t n,
                         DataType dtype, ReduceOp op, int avg_divisor, cudaStream_t stream) {
  if (num_inputs < 1 || num_inputs > kMaxReduceInputs || num_outputs < 1 || num_outputs > kMaxReduceOutputs ||
      avg_divisor < 1) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  // A launch's errors are read back with cudaGetLastError: drop one that an earlier, ignored
  // failure left (a cudaFree or an unmapping that failed), or this launch would be blamed for it.
  cudaGetLastError();
  Inputs in{};
  for (int k = 0; k < num_inputs; ++k) in.ptr[k] = inputs[k];
  Outputs out{};
  for (int k = 0; k < num_outputs; ++k) out.ptr[k] = outputs[k];
  switch (dtype) {
    case DataType::kFloat16:
      return ForOp<Half>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kBFloat16:
      return ForOp<BFloat16>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kFloat32:
      return ForOp<Native<float>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kFloat64:
      return ForOp<Native<double>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kInt8:
      return ForOp<Native<int8_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kUInt8:
      return ForOp<Native<uint8_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kInt32:
      return ForOp<Native<int32_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kInt64:
      return ForOp<Native<int64_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kUInt32:
      return ForOp<Native<uint32_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
    case DataType::kUInt64:
      return ForOp<Native<uint64_t>>(op, in, num_inputs, out, num_outputs, n, avg_divisor, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pycomm::cuda
