"""pycomm: a high-performance allreduce engine for data-parallel training.

import pycomm, numpy as np
comm = pycomm.Communicator()              # over MPI.COMM_WORLD
y = comm.allreduce(np.ones(10, np.float32))
"""

from ._native import BUILD_MPI, RUNTIME_MPI
from .communicator import Communicator, Work
from .dtypes import SUPPORTED as SUPPORTED_DTYPES
from .errors import CommError, PeerError
from .ops import ReduceOp

__version__ = "0.1.0"

__all__ = [
    "BUILD_MPI",
    "RUNTIME_MPI",
    "SUPPORTED_DTYPES",
    "CommError",
    "Communicator",
    "PeerError",
    "ReduceOp",
    "Work",
    "__version__",
]
