// The reduction kernels, exposed so that tests can check them against numpy directly.
#include <cstdint>

#include "pycomm/pycomm.h"
#include "python/bindings.h"
#include "reduce/reduce.h"

namespace py = pybind11;

namespace pycomm::python {

void RegisterKernels(py::module_& m) {
  m.def(
      "reduce_kernel",
      [](uintptr_t a, uintptr_t b, uintptr_t out, size_t n, int dtype, int op) {
        if (dtype < 0 || dtype >= kNumDataTypes || op < 0 || op >= kNumReduceOps) {
          throw py::value_error("pycomm: unknown dtype or op code");
        }
        GetReduceFn(static_cast<DataType>(dtype), static_cast<ReduceOp>(op))(
            reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), reinterpret_cast<void*>(out), n);
      },
      py::call_guard<py::gil_scoped_release>(), "out = a op b over n elements (testing hook)");
  m.def(
      "scale_down_kernel",
      [](uintptr_t buf, size_t n, int dtype, int divisor) {
        if (dtype < 0 || dtype >= kNumDataTypes || divisor <= 0) {
          throw py::value_error("pycomm: unknown dtype code or non-positive divisor");
        }
        ScaleDown(reinterpret_cast<void*>(buf), n, static_cast<DataType>(dtype), divisor);
      },
      py::call_guard<py::gil_scoped_release>(), "buf /= divisor over n elements (testing hook)");
}

}  // namespace pycomm::python
