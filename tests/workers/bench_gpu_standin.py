"""python -m pycomm.bench --device gpu on a stand-in GPU whose arrays are numpy arrays, so that
the sweep's GPU path (filled through uploads, checked through downloads, timed up to a
synchronisation, MPI through host copies) runs under mpirun where no GPU exists. Rank 0 prints
how often each stand-in method ran. STANDIN_FAILS_ON=R: rank R's GPU cannot be set up."""

import os
import sys
from collections import Counter

import numpy as np

from pycomm import bench

calls = Counter()


class StandInGpu:
    library = "stand-in"
    device_name = "host memory standing in for a GPU"

    def __init__(self, library, local_rank):
        calls["init"] += 1
        if os.environ.get("STANDIN_FAILS_ON") == str(bench.MPI.COMM_WORLD.rank):
            raise RuntimeError("cudaErrorDevicesUnavailable (stand-in)")

    def empty(self, count, dtype):
        return np.full(count, 99, dtype)  # not zeros: a fill that never arrives shows as wrong

    def upload(self, host, x):
        calls["upload"] += 1
        x[...] = host

    def download(self, x, dtype):
        calls["download"] += 1
        return np.array(x, dtype=dtype, copy=True)

    def copy(self, dst, src):
        calls["copy"] += 1
        dst[...] = src

    def synchronize(self):
        calls["synchronize"] += 1


bench.GpuArrays = StandInGpu
bench.FLOOR_DEVICE_COPY_BYTES = 1 << 20  # the floor's copies run in host memory here: keep them short
status = bench.main(sys.argv[1:])
if bench.MPI.COMM_WORLD.rank == 0:
    # One write: unbuffered, each piece of a print would get the launcher's rank prefix.
    sys.stdout.write("stand-in calls: " + " ".join(f"{name}={n}" for name, n in sorted(calls.items())) + "\n")
sys.exit(status)
