"""Small in-place allreduces of torch CPU tensors against numpy arrays and MPI_Allreduce.

    mpirun -n 2 python bench/torch_cpu_latency.py [--repeats 7] [--json PATH]

Each figure is the slowest rank's mean time per call over a loop, the median over --repeats
loops; the cases take turns within each repeat, so that the machine's noise falls on all alike.
The baseline is mpi4py's `Allreduce(MPI.IN_PLACE, a)` on a numpy array of the same size (for a
tensor an MPI user would pass `t.numpy()`, timed too). At these sizes a call is mostly its Python.
"""

import argparse
import statistics

import numpy as np
import torch
from collective_latency import per_call_us, report  # bench/'s own
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD


def cases(comm, array: np.ndarray, tensor) -> dict:
    return {
        "MPI_Allreduce (mpi4py, numpy)": lambda: world.Allreduce(MPI.IN_PLACE, array),
        "MPI_Allreduce (mpi4py, tensor.numpy())": lambda: world.Allreduce(MPI.IN_PLACE, tensor.numpy()),
        "pycomm, numpy in place": lambda: comm.allreduce(array, out=array),
        "pycomm, torch tensor in place": lambda: comm.allreduce(tensor, out=tensor),
        "pycomm, torch tensor into a new one (Horovod's form)": lambda: comm.allreduce(tensor),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    comm = pycomm.Communicator()
    results = {}
    for nbytes in (8, 64 << 10):
        calls = cases(comm, np.ones(nbytes // 4, np.float32), torch.ones(nbytes // 4))
        iters = 20000 if nbytes < 1024 else 2000
        samples = {name: [] for name in calls}
        for _ in range(a.repeats):
            for name, call in calls.items():
                samples[name].append(per_call_us(call, iters))
        baseline = statistics.median(samples["MPI_Allreduce (mpi4py, numpy)"])
        for name, times in samples.items():
            us = statistics.median(times)
            results[f"{name}, {nbytes} B"] = {"us": us, "vs_mpi": baseline / us}
    report(
        f"# P={comm.size}, float32 sum in place; us per call (median of {a.repeats}); x MPI = MPI's time / this",
        [f"{k:64s} {r['us']:9.2f} us  {r['vs_mpi']:6.2f} x MPI" for k, r in results.items()],
        results,
        a.json,
    )
    comm.close()


if __name__ == "__main__":
    main()
