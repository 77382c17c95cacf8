"""Ranks set up differently across simulated nodes; run under mpirun by the tests.

usage: node_settings.py inter|chunk|device
- inter: rank 3 sends slices between nodes by pycomm's ring, the others by MPI_Iallreduce.
- chunk: rank 0 has another chunk_bytes than the others.
- device: a device allreduce (of a stand-in for a GPU array, never touched) under the
  PYCOMM_GPU_INTER_NODE the test sets.
Every rank prints the error it got (or "no error").
"""

import sys
import types

import numpy as np
from mpi4py import MPI

import pycomm

RANK = MPI.COMM_WORLD.rank


class StandInDeviceArray:
    """A GPU array as far as pycomm's argument checks can tell, read as a cupy array is (it says
    its GPU: no driver call); its memory is never touched."""

    def __init__(self, ptr):
        self.shape, self.dtype = (4,), np.dtype(np.float32)
        self.data = types.SimpleNamespace(ptr=ptr)
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.device = types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (self.data.ptr, False), "version": 3}


StandInDeviceArray.__module__ = "cupy"


def main():
    what = sys.argv[1]
    try:
        if what == "inter":
            comm = pycomm.Communicator(inter_node="ring" if RANK == 3 else "mpi", timeout=20)
            comm.allreduce(np.ones(1 << 16, np.float32))
        elif what == "device":
            comm = pycomm.Communicator(timeout=20)
            # stream= given: no cupy module to ask for its current stream
            comm.allreduce(StandInDeviceArray(0x7F0000000000), out=StandInDeviceArray(0x7F0000100000), stream=0)
        else:
            comm = pycomm.Communicator(chunk_bytes=4096 if RANK == 0 else 65536)
            comm.allreduce(np.ones(10, np.float32))
        print(f"rank {RANK}: no error", flush=True)
    except (pycomm.CommError, ValueError) as error:
        print(f"rank {RANK}: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    main()
