"""Time per call of every collective at a few sizes, against MPI's, for comparing two builds of pycomm.

    mpirun -n 2 python bench/collective_latency.py [--repeats 5] [--json PATH]

Each figure is the median over --repeats loops of the slowest rank's mean time per call; pycomm's
call and mpi4py's (MPI_Barrier, MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block,
MPI_Allreduce in place, MPI_Iallreduce in place + MPI_Wait) take turns within each repeat, into
buffers allocated once, and "x MPI" is MPI's time over pycomm's. Rank 0 prints them. Put another
build first on PYTHONPATH to time it the same way (bench/README.md: A/B runs).
"""

import argparse
import json
import statistics

import numpy as np
from mpi4py import MPI

import pycomm
from pycomm.bench import time_calls

world = MPI.COMM_WORLD

CASES = [  # (name, bytes of x: every rank's input; reduce_scatter's is size times that)
    ("barrier", 0),
    ("broadcast", 8),
    ("broadcast", 4 << 10),
    ("broadcast", 64 << 10),
    ("allgather", 8),
    ("allgather", 4 << 10),
    ("allgather", 64 << 10),
    ("reduce_scatter", 8),
    ("reduce_scatter", 4 << 10),
    ("reduce_scatter", 64 << 10),
    ("allreduce", 8),
    ("allreduce", 64 << 10),
    ("allreduce", 1 << 20),
    ("allreduce", 16 << 20),
    ("allreduce_async", 8),  # issued and waited for at once, as osu_iallreduce without compute
    ("allreduce_async", 64 << 10),
]


def calls(comm, name: str, nbytes: int):
    """(pycomm's call, MPI's) for one case, on buffers made here."""
    P = comm.size
    x = np.ones(max(1, nbytes // 4) * (P if name == "reduce_scatter" else 1), np.float32)
    if name == "barrier":
        return comm.barrier, world.Barrier
    if name == "broadcast":
        return lambda: comm.broadcast(x), lambda: world.Bcast(x)
    if name == "allgather":
        out = np.empty(x.size * P, np.float32)
        return lambda: comm.allgather(x, out=out), lambda: world.Allgather(x, out)
    if name == "reduce_scatter":
        out = np.empty(x.size // P, np.float32)
        return lambda: comm.reduce_scatter(x, out=out), lambda: world.Reduce_scatter_block(x, out)
    if name == "allreduce_async":
        return lambda: comm.allreduce_async(x, out=x).wait(), lambda: world.Iallreduce(MPI.IN_PLACE, x).Wait()
    return lambda: comm.allreduce(x, out=x), lambda: world.Allreduce(MPI.IN_PLACE, x)


def per_call_us(call, iters: int) -> float:
    """The slowest rank's microseconds per call over `iters` calls, after iters / 10 untimed."""
    for _ in range(max(1, iters // 10)):
        call()
    return time_calls(call, iters, world) * 1e6


def report(header: str, lines: list, results: dict, json_path) -> None:
    """On rank 0: the header, a line per case, and the results as JSON where asked for."""
    if world.rank != 0:
        return
    print(header)
    for line in lines:
        print(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    comm = pycomm.Communicator()
    results = {}
    for name, nbytes in CASES:
        ours, theirs = calls(comm, name, nbytes)
        iters = max(5, min(2000, (64 << 20) // max(nbytes, 1) // 8))
        samples = {"pycomm": [], "mpi": []}
        for _ in range(a.repeats):
            samples["pycomm"].append(per_call_us(ours, iters))
            samples["mpi"].append(per_call_us(theirs, iters))
        us, mpi_us = statistics.median(samples["pycomm"]), statistics.median(samples["mpi"])
        results[f"{name} {nbytes} B"] = {"us": us, "mpi_us": mpi_us, "vs_mpi": mpi_us / us}
    report(
        f"# P={comm.size}; us per call (median of {a.repeats}); x MPI = MPI's time / pycomm's",
        [
            f"{k:28s} {r['us']:10.2f} us  MPI {r['mpi_us']:10.2f} us  {r['vs_mpi']:6.2f} x MPI"
            for k, r in results.items()
        ],
        results,
        a.json,
    )
    comm.close()


if __name__ == "__main__":
    main()
