#pragma once

#include <pybind11/pybind11.h>

namespace pycomm::python {

void RegisterErrors(pybind11::module_& m);
void RegisterCommunicator(pybind11::module_& m);
void RegisterKernels(pybind11::module_& m);

}  // namespace pycomm::python
