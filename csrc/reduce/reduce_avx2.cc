// The kernels compiled with -mavx2 -mf16c (CMakeLists.txt); used only where the CPU has both.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "reduce/half.h"
#include "reduce/reduce.h"

namespace pycomm::avx2 {

#include "reduce/kernels.inc"

}  // namespace pycomm::avx2
