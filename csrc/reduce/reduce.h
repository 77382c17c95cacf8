// CPU reduction kernels: every dtype x op, as plain loops the compiler vectorises at -O3.
#pragma once

#include <cstddef>

#include "pycomm/pycomm.h"

namespace pycomm {

// out[i] = a[i] op b[i] for i < n. `out` may alias `a` or `b` exactly (in-place reduction) but
// must not partially overlap them. float16 and bfloat16 are computed in float32 and rounded once.
// ReduceOp::kAvg reduces as kSum; ScaleDown finishes the average.
using ReduceFn = void (*)(const void* a, const void* b, void* out, size_t n);

ReduceFn GetReduceFn(DataType dtype, ReduceOp op);

// buf[i] /= divisor, for the floating-point types (kAvg's last step).
void ScaleDown(void* buf, size_t n, DataType dtype, int divisor);

}  // namespace pycomm
