"""Broadcast, allgather and reduce_scatter under each algorithm forced in turn, beside MPI's call:
the measurements behind their cut-overs (OneShotTakesOthers, docs/algorithms.md).

    mpirun -n P python bench/collective_algorithms.py [--collective broadcast] [-b 4K] [-e 64M]

Sizes are the call's largest buffer (allgather's output, reduce_scatter's input), by 4 from -b to
-e. Each figure is the slowest rank's mean time per call, the median of 5 loops; "auto x MPI" is
MPI's time over auto's (MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block through mpi4py).
"""

import argparse
import statistics

import numpy as np
from collective_latency import per_call_us  # bench/'s own
from mpi4py import MPI

import pycomm
from pycomm.settings import parse_size

world = MPI.COMM_WORLD
ALGORITHMS = ("oneshot", "singlecopy", "ring", "auto")  # broadcast's "ring" is the chain


def median_us(call, iters: int) -> float:
    """The median of 5 loops of per_call_us."""
    return statistics.median(per_call_us(call, iters) for _ in range(5))


def calls(name: str, total: int, comms: dict) -> dict:
    """{label: call} for MPI and each algorithm, on buffers made here."""
    P = world.size
    whole = np.ones(total // 4, np.float32)
    block = np.ones(total // 4 // P, np.float32)
    if name == "broadcast":
        out = {"MPI": lambda: world.Bcast(whole)}
        out.update({a: (lambda c=c: c.broadcast(whole)) for a, c in comms.items()})
    elif name == "allgather":
        out = {"MPI": lambda: world.Allgather(block, whole)}
        out.update({a: (lambda c=c: c.allgather(block, out=whole)) for a, c in comms.items()})
    else:
        out = {"MPI": lambda: world.Reduce_scatter_block(whole, block)}
        out.update({a: (lambda c=c: c.reduce_scatter(whole, out=block)) for a, c in comms.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--collective", choices=("broadcast", "allgather", "reduce_scatter"), default="broadcast")
    p.add_argument("-b", "--min-bytes", default="4K")
    p.add_argument("-e", "--max-bytes", default="64M")
    a = p.parse_args()
    comms = {name: pycomm.Communicator(algorithm=name) for name in ALGORITHMS}
    total, last = parse_size(a.min_bytes), parse_size(a.max_bytes)
    if world.rank == 0:
        print(f"# {a.collective}, P={world.size}, float32; us per call (median of 5)")
        print(f"# {'bytes':>10} " + " ".join(f"{label:>11}" for label in ("MPI", *ALGORITHMS)) + "  auto x MPI")
    while total <= last:
        times = {
            label: per_call_us(call, max(3, min(5000, (256 << 20) // total)))
            for label, call in calls(a.collective, total, comms).items()
        }
        if world.rank == 0:
            cells = " ".join(f"{times[label]:11.1f}" for label in ("MPI", *ALGORITHMS))
            print(f"  {total:>10} {cells}  {times['MPI'] / times['auto']:10.2f}")
        total *= 4
    for c in comms.values():
        c.close()


if __name__ == "__main__":
    main()
