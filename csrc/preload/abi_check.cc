#include "preload/abi_check.h"

#include <dlfcn.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace pycomm {
namespace preload {

namespace {

const char* LibraryOf(void* symbol) {
  Dl_info info;
  if (!symbol || !dladdr(symbol, &info) || !info.dli_fname) return nullptr;
  return info.dli_fname;
}

void Check() {
  // The next MPI_Allreduce after this library's: the one the program would have called.
  const char* theirs = LibraryOf(dlsym(RTLD_NEXT, "MPI_Allreduce"));
  const char* ours = LibraryOf(reinterpret_cast<void*>(&PMPI_Allreduce));
  if (!theirs || !ours) return;  // cannot tell (a static libmpi): trust the build
  void* theirs_handle = dlopen(theirs, RTLD_LAZY | RTLD_NOLOAD);
  void* ours_handle = dlopen(ours, RTLD_LAZY | RTLD_NOLOAD);
  const bool same = theirs_handle == ours_handle || std::strcmp(theirs, ours) == 0;
  if (theirs_handle) dlclose(theirs_handle);
  if (ours_handle) dlclose(ours_handle);
  if (same) return;
  std::fprintf(stderr,
               "pycomm preload: this program's MPI_Allreduce comes from %s, but libpycomm_mpi.so was built for "
               "the MPICH ABI of %s; their handles differ, so it cannot run. Do not preload it here.\n",
               theirs, ours);
  std::abort();
}

}  // namespace

void CheckSameMpi() {
  static std::once_flag once;
  std::call_once(once, Check);
}

}  // namespace preload
}  // namespace pycomm
