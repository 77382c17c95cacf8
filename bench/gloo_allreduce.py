"""pycomm against torch.distributed's gloo backend (and MPI_Allreduce), size by size, interleaved.

    mpirun -n 2 python bench/gloo_allreduce.py [-b 8] [-e 256M] [--repeats 3] [--json PATH]

mpirun starts the ranks; gloo meets through a TCP store on rank 0 (its address and a free port
go to the others through MPI). Each size: the three engines take turns, --repeats times, each
timing a loop of calls after a barrier (the slowest rank's mean counts); the median is shown.
float32 sum on torch CPU tensors: the same tensor goes to all three (pycomm and mpi4py take it
as a zero-copy numpy view).
"""

import argparse
import datetime
import json
import os
import socket
import statistics

import torch
import torch.distributed as dist
from mpi4py import MPI

import pycomm
from pycomm.bench import time_calls
from pycomm.settings import parse_size

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank


def start_gloo() -> None:
    address = port = None
    if RANK == 0:
        with socket.socket() as s:  # a free port; the store binds it a moment later
            s.bind(("127.0.0.1", 0))
            address, port = "127.0.0.1", s.getsockname()[1]
    address, port = world.bcast((address, port), root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=RANK, world_size=P)


def iterations(call) -> int:
    per_call = time_calls(call, 3, world)
    return world.bcast(int(min(1000, max(3, 0.2 / max(per_call, 1e-9)))), root=0)


def engines_on(comm, x: torch.Tensor) -> dict:
    view = x.numpy()
    return {
        "pycomm": lambda: comm.allreduce(view, out=view),
        "gloo": lambda: dist.all_reduce(x),
        "mpi": lambda: world.Allreduce(MPI.IN_PLACE, view),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--min-bytes", default="8")
    parser.add_argument("-e", "--max-bytes", default="256M")
    parser.add_argument("-f", "--factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    start_gloo()
    torch.set_num_threads(1)
    comm = pycomm.Communicator()
    factor = 2 * (P - 1) / P
    rows = []
    if RANK == 0:
        print(f"# P={P} float32 sum, torch {torch.__version__} gloo, {pycomm.BUILD_MPI}, {datetime.date.today()}")
        columns = f"{'size(B)':>10} {'pycomm(us)':>11} {'gloo(us)':>10} {'mpi(us)':>9}"
        print(f"# {columns}  busbw GB/s: pycomm/gloo/mpi  x_gloo x_mpi")
    size = parse_size(args.min_bytes)
    while size <= parse_size(args.max_bytes):
        n = max(1, size // 4)
        x = torch.full((n,), float(RANK + 1))
        engines = engines_on(comm, x)
        # One correctness check of each: in place, the sum of 1..P is the same every time only
        # for the first call, so it runs on fresh input.
        for name, call in engines.items():
            x.fill_(float(RANK + 1))
            call()
            if not bool((x == P * (P + 1) / 2).all()):
                raise SystemExit(f"{name} gave a wrong result at {size} bytes")
        iters = {name: iterations(call) for name, call in engines.items()}
        times = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, call in engines.items():
                x.fill_(0.0)  # no overflow to inf over many in-place sums
                times[name].append(time_calls(call, iters[name], world))
        med = {name: statistics.median(t) for name, t in times.items()}
        busbw = {name: n * 4 / t * factor / 1e9 for name, t in med.items()}
        row = {
            "size": n * 4,
            **{f"{k}_us": v * 1e6 for k, v in med.items()},
            **{f"{k}_busbw": v for k, v in busbw.items()},
        }
        rows.append(row)
        if RANK == 0:
            print(
                f"  {n * 4:>10} {med['pycomm'] * 1e6:>11.2f} {med['gloo'] * 1e6:>10.2f} {med['mpi'] * 1e6:>9.2f}"
                f"  {busbw['pycomm']:>6.3f} {busbw['gloo']:>6.3f} {busbw['mpi']:>6.3f}"
                f"  {med['gloo'] / med['pycomm']:>6.2f} {med['mpi'] / med['pycomm']:>5.2f}",
                flush=True,
            )
        size *= args.factor
    comm.close()
    dist.destroy_process_group()
    if RANK == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"P": P, "date": datetime.datetime.now().isoformat(), "cwd": os.getcwd(), "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
