"""Loads the native core, after mpi4py has loaded the MPI library it was compiled against."""

from mpi4py import MPI  # must come first: it loads the libmpi that _core links to


def _runtime_mpi() -> str:
    return MPI.Get_library_version().strip().splitlines()[0]


def _family(version: str) -> str:
    lowered = version.lower()
    for family in ("mpich", "open mpi", "intel", "mvapich"):
        if family in lowered:
            return family
    return lowered.split()[0] if lowered else "unknown"


try:
    from . import _core
except ImportError as error:  # most often: libmpi of another MPI family than the build's
    raise ImportError(
        f"pycomm's native module failed to load ({error}). mpi4py is using {_runtime_mpi()!r}; "
        "pycomm must be built against the same MPI (by default the `mpich` wheel). "
        "Reinstall pycomm in this environment: pip install --force-reinstall --no-deps <pycomm source>"
    ) from error

BUILD_MPI = _core.mpi_build_version()
RUNTIME_MPI = _runtime_mpi()

if _family(BUILD_MPI) != _family(RUNTIME_MPI):
    raise ImportError(
        f"pycomm was built against {BUILD_MPI} but mpi4py is using {RUNTIME_MPI}: the two are not "
        "binary compatible. Rebuild pycomm with the MPI that mpi4py uses, or install mpi4py for the "
        "MPI pycomm was built with."
    )

__all__ = ["BUILD_MPI", "RUNTIME_MPI", "_core"]
