"""Time per call of every collective at a few sizes, for comparing two builds of pycomm.

    mpirun -n 2 python bench/collective_latency.py [--json PATH]

Each figure is the median over --repeats loops of the mean time per call; rank 0 prints them.
Put another build first on PYTHONPATH to time it the same way (bench/README.md: A/B runs).
"""

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

import pycomm

CASES = [  # (name, bytes)
    ("barrier", 0),
    ("broadcast", 8),
    ("allgather", 8),
    ("reduce_scatter", 8),
    ("allreduce", 8),
    ("allreduce", 64 << 10),
    ("allreduce", 1 << 20),
    ("allreduce", 16 << 20),
]


def call(comm, name: str, x: np.ndarray):
    if name == "barrier":
        return comm.barrier()
    if name == "broadcast":
        return comm.broadcast(x)
    if name == "allgather":
        return comm.allgather(x)
    if name == "reduce_scatter":
        return comm.reduce_scatter(x)
    return comm.allreduce(x, out=x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    comm = pycomm.Communicator()
    results = {}
    for name, nbytes in CASES:
        count = max(1, nbytes // 4) * (comm.size if name == "reduce_scatter" else 1)
        x = np.ones(count, np.float32)
        iters = max(5, min(2000, (64 << 20) // max(nbytes, 1) // 8))
        samples = []
        for _ in range(a.repeats):
            for _ in range(max(1, iters // 10)):
                call(comm, name, x)
            MPI.COMM_WORLD.Barrier()
            start = time.perf_counter()
            for _ in range(iters):
                call(comm, name, x)
            samples.append((time.perf_counter() - start) / iters * 1e6)
        results[f"{name} {nbytes} B"] = statistics.median(samples)
    if comm.rank == 0:
        for key, us in results.items():
            print(f"{key:28s} {us:10.2f} us")
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)
    comm.close()


if __name__ == "__main__":
    main()
