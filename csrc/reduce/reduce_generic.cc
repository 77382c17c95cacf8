// The kernels for any x86-64 (or other) CPU, as the compiler vectorises them with its defaults.
#include <cstdint>
#include <type_traits>

#include "reduce/half.h"
#include "reduce/reduce.h"

namespace pycomm::generic {

#include "reduce/kernels.inc"

}  // namespace pycomm::generic
