// The pybind11 module pycomm._core. Each area registers itself from its own file.
#include <pybind11/pybind11.h>

#include "python/bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pycomm's native core; use the pycomm package, not this module";
  pycomm::python::RegisterErrors(m);
  pycomm::python::RegisterCommunicator(m);
  pycomm::python::RegisterKernels(m);
}
