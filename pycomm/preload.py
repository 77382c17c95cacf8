"""Where libpycomm_mpi.so lives: the MPI_Allreduce interposer for unchanged MPI programs.

    mpirun -n 4 -genv LD_PRELOAD=$(python -m pycomm.preload) ./app

Preloaded, the library runs MPI_Allreduce (and MPI_Allreduce_c) on the pycomm engine for the
datatypes and ops it supports and passes every other call to PMPI_Allreduce. It is built against
the MPICH ABI (libmpi.so.12) that pycomm itself is built with; see the README.
"""

import sys
from pathlib import Path

LIBRARY_NAME = "libpycomm_mpi.so"


def library_path() -> str:
    """The absolute path of libpycomm_mpi.so installed with this package."""
    import pycomm

    # pycomm.__path__ spans the source checkout and the installed package (editable installs put
    # the compiled files only in the latter).
    for directory in pycomm.__path__:
        candidate = Path(directory) / LIBRARY_NAME
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"{LIBRARY_NAME} is not installed with pycomm (searched {', '.join(pycomm.__path__)}); "
        "reinstall pycomm (pip install .) with PYCOMM_BUILD_PRELOAD left on"
    )


def main() -> int:
    try:
        print(library_path())
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
