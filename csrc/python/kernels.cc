// The reduction kernels, exposed so that tests can check them against numpy directly.
#include <cstdint>
#include <string>

#include "pycomm/pycomm.h"
#include "python/bindings.h"
#include "reduce/reduce.h"

namespace py = pybind11;

namespace pycomm::python {

namespace {

KernelIsa ToIsa(const std::string& name) {
  if (name == "auto") return KernelIsa::kAuto;
  if (name == "generic") return KernelIsa::kGeneric;
  if (name == "avx2") return KernelIsa::kAvx2;
  throw py::value_error("pycomm: kernel set must be auto, generic or avx2, got " + name);
}

const char* IsaName(KernelIsa isa) { return isa == KernelIsa::kAvx2 ? "avx2" : "generic"; }

}  // namespace

void RegisterKernels(py::module_& m) {
  m.def(
      "kernel_isa", [](const std::string& isa) { return IsaName(ActiveKernelIsa(ToIsa(isa))); },
      py::arg("isa") = "auto", "the kernel set that `isa` resolves to on this CPU");
  m.def(
      "reduce_kernel",
      [](uintptr_t a, uintptr_t b, uintptr_t out, size_t n, int dtype, int op, const std::string& isa) {
        if (dtype < 0 || dtype >= kNumDataTypes || op < 0 || op >= kNumReduceOps) {
          throw py::value_error("pycomm: unknown dtype or op code");
        }
        ReduceFn fn = GetReduceFn(static_cast<DataType>(dtype), static_cast<ReduceOp>(op), ToIsa(isa));
        py::gil_scoped_release release;
        fn(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), reinterpret_cast<void*>(out), n);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("dtype"), py::arg("op"),
      py::arg("isa") = "auto", "out = a op b over n elements (testing hook)");
  m.def(
      "scale_down_kernel",
      [](uintptr_t buf, size_t n, int dtype, int divisor, const std::string& isa) {
        if (dtype < 0 || dtype >= kNumDataTypes || divisor <= 0) {
          throw py::value_error("pycomm: unknown dtype code or non-positive divisor");
        }
        KernelIsa chosen = ToIsa(isa);
        py::gil_scoped_release release;
        ScaleDown(reinterpret_cast<void*>(buf), n, static_cast<DataType>(dtype), divisor, chosen);
      },
      py::arg("buf"), py::arg("n"), py::arg("dtype"), py::arg("divisor"), py::arg("isa") = "auto",
      "buf /= divisor over n elements (testing hook)");
}

}  // namespace pycomm::python
