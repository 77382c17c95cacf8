#include "preload/errors.h"

#include <cstdio>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "preload/log.h"
#include "pycomm/pycomm.h"

namespace pycomm {
namespace preload {

namespace {

int ClassOfCurrentException(std::string* what) {
  try {
    throw;
  } catch (const std::bad_alloc& e) {
    *what = e.what();
    return MPI_ERR_NO_MEM;
  } catch (const std::invalid_argument& e) {
    *what = e.what();
    return MPI_ERR_ARG;
  } catch (const CommError& e) {  // MismatchError and PeerError included
    *what = e.what();
    return MPI_ERR_OTHER;
  } catch (const std::exception& e) {
    *what = e.what();
    return MPI_ERR_INTERN;
  } catch (...) {
    *what = "unknown exception";
    return MPI_ERR_UNKNOWN;
  }
}

}  // namespace

int ReportEngineError(MPI_Comm comm, const char* call) {
  std::string what;
  const int error_class = ClassOfCurrentException(&what);
  std::string message = std::string(call) + " on the pycomm engine: " + what;
  if (message.size() >= MPI_MAX_ERROR_STRING) message.resize(MPI_MAX_ERROR_STRING - 1);
  Debug("%s", message.c_str());
  // A code of its own carries the message to MPI_Error_string and to the error handler's output;
  // where MPI cannot add one, the bare class still says what kind of failure it was.
  int code = error_class;
  int added = 0;
  if (PMPI_Add_error_code(error_class, &added) == MPI_SUCCESS &&
      PMPI_Add_error_string(added, message.c_str()) == MPI_SUCCESS) {
    code = added;
  }
  PMPI_Comm_call_errhandler(comm, code);  // returns only when the handler does (MPI_ERRORS_RETURN)
  return code;
}

}  // namespace preload
}  // namespace pycomm
