# Installs the public header and the static libraries with a CMake package, so that a C++ project
# can `find_package(pycomm CONFIG)` and link `pycomm::pycomm` (Communicator::FromMpi and the rest of
# csrc/include/pycomm/pycomm.h):
#
#   cmake -S . -B build/cpp -DPYCOMM_BUILD_PYTHON=OFF && cmake --build build/cpp -j2
#   cmake --install build/cpp --prefix <prefix>       # then -DCMAKE_PREFIX_PATH=<prefix> in the project
#
# A wheel (scikit-build-core) carries the same files inside the package: pycomm/include,
# pycomm/lib and pycomm/lib/cmake/pycomm; `python -m pycomm.cmake` prints the last one.
#
# Exported (namespace pycomm::): pycomm_core, the device library (pycomm_nodevice, or pycomm_cuda
# in a CUDA build), pycomm_mpi and `pycomm`, which brings them all. The libraries are static and
# position-independent, so they link into executables and shared libraries alike.

option(PYCOMM_INSTALL "Install the C++ header, static libraries and CMake package (pycomm::pycomm)" ON)
if(NOT PYCOMM_INSTALL)
  return()
endif()
if(NOT TARGET pycomm_mpi)
  message(STATUS "pycomm: no MPI found, so the C++ package (pycomm::pycomm) is not installed")
  return()
endif()

include(CMakePackageConfigHelpers)
include(GNUInstallDirs)
include(${CMAKE_CURRENT_LIST_DIR}/pycommMpiFamily.cmake)

if(SKBUILD)
  # Inside the Python package, next to _core: the wheel's files stay in one directory.
  set(PYCOMM_INSTALL_INCLUDEDIR pycomm/include)
  set(PYCOMM_INSTALL_LIBDIR pycomm/lib)
else()
  set(PYCOMM_INSTALL_INCLUDEDIR ${CMAKE_INSTALL_INCLUDEDIR})
  set(PYCOMM_INSTALL_LIBDIR ${CMAKE_INSTALL_LIBDIR})
endif()
set(PYCOMM_INSTALL_CMAKEDIR ${PYCOMM_INSTALL_LIBDIR}/cmake/pycomm)

# One version, pyproject.toml's.
if(DEFINED SKBUILD_PROJECT_VERSION)
  set(PYCOMM_VERSION ${SKBUILD_PROJECT_VERSION})
else()
  file(STRINGS ${PROJECT_SOURCE_DIR}/pyproject.toml _pycomm_version_line REGEX "^version *= *\"")
  string(REGEX MATCH "[0-9]+(\\.[0-9]+)*" PYCOMM_VERSION "${_pycomm_version_line}")
endif()

add_library(pycomm INTERFACE)
target_link_libraries(pycomm INTERFACE pycomm_mpi)
add_library(pycomm::pycomm ALIAS pycomm)

install(TARGETS pycomm pycomm_mpi pycomm_core ${PYCOMM_DEVICE_LIB}
        EXPORT pycommTargets
        ARCHIVE DESTINATION ${PYCOMM_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${PYCOMM_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/csrc/include/pycomm DESTINATION ${PYCOMM_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h")
install(EXPORT pycommTargets NAMESPACE pycomm:: DESTINATION ${PYCOMM_INSTALL_CMAKEDIR})

# What the package config needs to know about this build: whether the device library needs the
# CUDA runtime, and which MPI pycomm_mpi was compiled against (the project's MPI must match it).
if(TARGET pycomm_cuda)
  set(PYCOMM_WITH_CUDA ON)
else()
  set(PYCOMM_WITH_CUDA OFF)
endif()
pycomm_mpi_family(PYCOMM_MPI_FAMILY PYCOMM_MPI_VERSION "${MPI_C_INCLUDE_DIRS}")
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/pycommConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/pycommConfig.cmake
                              INSTALL_DESTINATION ${PYCOMM_INSTALL_CMAKEDIR})
# 0.x releases promise nothing across minor versions.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pycommConfigVersion.cmake
                                 VERSION ${PYCOMM_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pycommConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/pycommConfigVersion.cmake
              ${CMAKE_CURRENT_LIST_DIR}/pycommMpiFamily.cmake
        DESTINATION ${PYCOMM_INSTALL_CMAKEDIR})
