// GPU reduction kernels: every dtype x op, a fused N-way reduce with 16-byte vector loads.
// Compiled only when the CUDA toolkit is found (PYCOMM_CUDA); nothing outside csrc/cuda/ and its
// users includes CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "pycomm/pycomm.h"

namespace pycomm::cuda {

// The most inputs one fused pass reads: enough for every peer of an 8-GPU node.
constexpr int kMaxReduceInputs = 8;

// The most outputs one fused pass writes.
constexpr int kMaxReduceOutputs = 8;

// r[i] = inputs[0][i] op inputs[1][i] op ... op inputs[num_inputs-1][i], for i < n, reduced in
// input order so that every caller with the same inputs gets the same bits, and written to every
// one of `outputs` (one pass serves all the ranks that share a GPU). float16 and bfloat16
// accumulate in float32 and are rounded once. With ReduceOp::kAvg the sum is divided by
// `avg_divisor` before the final rounding. An output may be one of the inputs. Enqueued on
// `stream`; returns the launch error, if any.
cudaError_t LaunchReduce(const void* const* inputs, int num_inputs, void* const* outputs, int num_outputs, size_t n,
                         DataType dtype, ReduceOp op, int avg_divisor, cudaStream_t stream);

}  // namespace pycomm::cuda
