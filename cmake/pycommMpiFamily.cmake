# pycomm_mpi_family(<family-var> <version-var> <include-dirs>): which MPI the mpi.h in
# <include-dirs> belongs to: family "MPICH" (MPICH and its ABI-compatible derivatives), "Open MPI",
# or "" when it cannot tell. Used when pycomm is built and again when a project finds it: MPI
# handles and libraries of different families are not interchangeable.
function(pycomm_mpi_family family_var version_var include_dirs)
  set(family "")
  set(version "")
  foreach(dir IN LISTS include_dirs)
    if(EXISTS "${dir}/mpi.h")
      file(STRINGS "${dir}/mpi.h" defines REGEX "^#define[ \t]+(MPICH_VERSION|OMPI_(MAJOR|MINOR|RELEASE)_VERSION)[ \t]")
      if(defines MATCHES "MPICH_VERSION[ \t]+\"([^\"]*)\"")
        set(family "MPICH")
        set(version "${CMAKE_MATCH_1}")
      elseif(defines MATCHES "OMPI_MAJOR_VERSION[ \t]+([0-9]+)")
        set(family "Open MPI")
        set(version "${CMAKE_MATCH_1}")
      endif()
      break()
    endif()
  endforeach()
  set(${family_var} "${family}" PARENT_SCOPE)
  set(${version_var} "${version}" PARENT_SCOPE)
endfunction()
