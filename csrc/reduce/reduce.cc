// Picks the kernels for this CPU once, at the first call.
#include "reduce/reduce.h"

#include <cstdlib>
#include <string>

namespace pycomm {

namespace generic {
ReduceFn GetReduceFn(DataType dtype, ReduceOp op);
ScaleFn GetScaleFn(DataType dtype);
}  // namespace generic

#if defined(PYCOMM_HAVE_AVX2_KERNELS)
namespace avx2 {
ReduceFn GetReduceFn(DataType dtype, ReduceOp op);
ScaleFn GetScaleFn(DataType dtype);
}  // namespace avx2
#endif

namespace {

bool CpuHasAvx2() {
#if defined(PYCOMM_HAVE_AVX2_KERNELS)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

KernelIsa Resolve(KernelIsa isa) {
  if (isa != KernelIsa::kAuto) return isa == KernelIsa::kAvx2 && !CpuHasAvx2() ? KernelIsa::kGeneric : isa;
  // PYCOMM_KERNELS=generic forces the baseline kernels (for comparisons and tests).
  static const KernelIsa chosen = [] {
    const char* forced = std::getenv("PYCOMM_KERNELS");
    if (forced && std::string(forced) == "generic") return KernelIsa::kGeneric;
    return CpuHasAvx2() ? KernelIsa::kAvx2 : KernelIsa::kGeneric;
  }();
  return chosen;
}

}  // namespace

KernelIsa ActiveKernelIsa(KernelIsa isa) { return Resolve(isa); }

ReduceFn GetReduceFn(DataType dtype, ReduceOp op, KernelIsa isa) {
#if defined(PYCOMM_HAVE_AVX2_KERNELS)
  if (Resolve(isa) == KernelIsa::kAvx2) return avx2::GetReduceFn(dtype, op);
#endif
  return generic::GetReduceFn(dtype, op);
}

void ScaleDown(void* buf, size_t n, DataType dtype, int divisor, KernelIsa isa) {
  ScaleFn scale = generic::GetScaleFn(dtype);
#if defined(PYCOMM_HAVE_AVX2_KERNELS)
  if (Resolve(isa) == KernelIsa::kAvx2) scale = avx2::GetScaleFn(dtype);
#endif
  if (!scale) throw CommError(std::string("pycomm: avg is not defined for ") + DataTypeName(dtype));
  scale(buf, n, divisor);
}

}  // namespace pycomm
