#include "pycomm/pycomm.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace pycomm::python {

void RegisterErrors(py::module_& m) {
  // Registered base first: pybind11 tries translators newest first, so PeerError wins for peers.
  auto comm_error = py::register_exception<CommError>(m, "CommError", PyExc_RuntimeError);
  py::register_exception<PeerError>(m, "PeerError", comm_error.ptr());
  py::register_exception<MismatchError>(m, "MismatchError", comm_error.ptr());
}

}  // namespace pycomm::python
