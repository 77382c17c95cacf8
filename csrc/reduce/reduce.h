// CPU reduction kernels: every dtype x op, as loops the compiler vectorises at -O3, compiled for
// baseline x86-64 and for AVX2 + F16C and chosen at run time.
#pragma once

#include <cstddef>

#include "pycomm/pycomm.h"

namespace pycomm {

// out[i] = a[i] op b[i] for i < n. `out` may alias `a` or `b` exactly (in-place reduction) but
// must not partially overlap them. float16 and bfloat16 are computed in float32 and rounded once.
// ReduceOp::kAvg reduces as kSum; ScaleDown finishes the average.
using ReduceFn = void (*)(const void* a, const void* b, void* out, size_t n);
// buf[i] /= divisor over n elements.
using ScaleFn = void (*)(void* buf, size_t n, int divisor);

// Which compiled set of kernels to use. kAuto: the best this CPU runs (AVX2 + F16C on x86-64
// where present), unless PYCOMM_KERNELS=generic. Every set gives the same bits.
enum class KernelIsa { kAuto, kGeneric, kAvx2 };

// The set that `isa` resolves to on this CPU.
KernelIsa ActiveKernelIsa(KernelIsa isa = KernelIsa::kAuto);

ReduceFn GetReduceFn(DataType dtype, ReduceOp op, KernelIsa isa = KernelIsa::kAuto);

// buf[i] /= divisor, for the floating-point types (kAvg's last step).
void ScaleDown(void* buf, size_t n, DataType dtype, int divisor, KernelIsa isa = KernelIsa::kAuto);

}  // namespace pycomm
