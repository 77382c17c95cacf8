"""pycomm: a high-performance allreduce engine for data-parallel training.

import pycomm, numpy as np
comm = pycomm.Communicator()              # over MPI.COMM_WORLD
y = comm.allreduce(np.ones(10, np.float32))
"""

import pkgutil

# Run from a source checkout (`python -m pycomm.bench` in the repository root), this directory
# shadows the installed package, which alone holds the compiled _core: search both.
__path__ = pkgutil.extend_path(__path__, __name__)

from ._native import BUILD_MPI, RUNTIME_MPI  # noqa: E402
from .communicator import Communicator, Work  # noqa: E402
from .dtypes import SUPPORTED as SUPPORTED_DTYPES  # noqa: E402
from .errors import CommError, MismatchError, PeerError  # noqa: E402
from .ops import ReduceOp  # noqa: E402

__version__ = "0.1.0"


def get_cmake_dir() -> str:
    """The directory of pycommConfig.cmake, for C++ projects: cmake -Dpycomm_DIR=... (also
    `python -m pycomm.cmake`)."""
    from .cmake import get_cmake_dir as cmake_dir  # imported here: `python -m pycomm.cmake` runs it

    return cmake_dir()


__all__ = [
    "BUILD_MPI",
    "RUNTIME_MPI",
    "SUPPORTED_DTYPES",
    "CommError",
    "Communicator",
    "MismatchError",
    "PeerError",
    "ReduceOp",
    "Work",
    "__version__",
    "get_cmake_dir",
]
