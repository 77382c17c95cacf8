"""An unchanged mpi4py program for the MPI_Allreduce interposer's tests (tests/test_preload_mpi.py).

usage: preload_mpi4py.py [--with-pycomm]

Comm.Allreduce (MPI_Allreduce_c on MPICH 5) over dtypes x ops x sizes, in place and not, on
COMM_WORLD, a Dup and a Split. Values are small integers (halves for floats), so every correct
reduction order gives the same bits; each result is checked against numpy, must be the same bits
on every rank of its communicator, and rank 0 prints "case <name> @<group> <sha1>" so that runs
with and without the interposer compare line for line. Random float32 sums are only required to
be bitwise identical across ranks. --with-pycomm also runs pycomm.Communicator in the same process
(pycomm._core beside the preloaded library). Prints the interposer's counters when it is loaded.
"""

import ctypes
import hashlib
import sys

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
RANK, P = world.rank, world.size
DTYPES = ["int8", "uint8", "int32", "uint32", "int64", "uint64", "float32", "float64"]
OPS = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}
failures = []


def make_input(rank, n, dtype, op):
    i = np.arange(n, dtype=np.int64)
    if op == "prod":
        v = (i + rank) % 3 + 1 if dtype.startswith("u") else (i + rank) % 5 - 2
    else:
        v = (i * 7 + rank * 13) % 21 - (0 if dtype.startswith("u") else 10)
    return (v * 0.5 if dtype.startswith("float") else v).astype(dtype)


def reference(inputs, op):
    stack = np.stack([x.astype(np.float64) for x in inputs]) if inputs[0].size else np.zeros((len(inputs), 0))
    fn = {"sum": np.sum, "prod": np.prod, "min": np.min, "max": np.max}[op]
    return fn(stack, axis=0).astype(inputs[0].dtype)


def digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8).tobytes()).hexdigest()[:16]


records = []


def record(name, comm, result, ok):
    group = comm.bcast(RANK, root=0)  # MPI_COMM_WORLD rank of the communicator's rank 0
    records.append((name, group, digest(result), bool(ok)))


def check(comm, label):
    size, rank = comm.size, comm.rank
    for dtype in DTYPES:
        itemsize = np.dtype(dtype).itemsize
        for op, mpi_op in OPS.items():
            sizes = [0, 1, 7, 1001]
            if label == "world" or op == "sum":
                sizes.append((1 << 20) // itemsize + 3)  # over 1 MiB
            for n in sizes:
                inputs = [make_input(q, n, dtype, op) for q in range(size)]
                expected = reference(inputs, op)
                x = inputs[rank].copy()
                y = np.full_like(x, 7)
                comm.Allreduce(x, y, op=mpi_op)
                ok = np.array_equal(y, expected) and np.array_equal(x, inputs[rank])
                record(f"{label}/{dtype}/{op}/n={n}/copy", comm, y, ok)
                comm.Allreduce(MPI.IN_PLACE, x, op=mpi_op)
                record(f"{label}/{dtype}/{op}/n={n}/inplace", comm, x, np.array_equal(x, expected))


def check_random_floats(comm, label):
    # Not exact: any summation order is allowed, but every rank must hold the same bits.
    x = np.random.default_rng(comm.rank + 17).standard_normal(100003).astype(np.float32)
    comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    hashes = comm.allgather(digest(x))
    ok = len(set(hashes)) == 1 and np.allclose(x, x, equal_nan=False)
    records.append((f"{label}/random-float32-sum-identical", comm.bcast(RANK, root=0), str(ok), ok))


def check_pycomm():
    # pycomm's own engine, in the same process as the interposer's private copy.
    import pycomm

    with pycomm.Communicator() as comm:
        y = comm.allreduce(np.arange(1000, dtype=np.int64) + RANK, op="sum")
        expected = P * np.arange(1000, dtype=np.int64) + P * (P - 1) // 2
        records.append(("pycomm/int64/sum", 0, digest(y), np.array_equal(y, expected)))


def emit(line):
    # One write per line: mpirun -prepend-rank prefixes each chunk it reads, so a line split over
    # two writes would get a prefix in its middle.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def summarise():
    gathered = world.gather(records, root=0)
    if RANK != 0:
        return
    for index, (name, _, _, _) in enumerate(records):
        by_group = {}
        for rank_records in gathered:
            _, group, hashed, ok = rank_records[index]
            by_group.setdefault(group, []).append((hashed, ok))
        for group, entries in sorted(by_group.items()):
            flags = ("" if all(ok for _, ok in entries) else " WRONG") + (
                "" if len({h for h, _ in entries}) == 1 else " RANKS-DIFFER"
            )
            emit(f"case {name} @{group} {entries[0][0]}{flags}")
            if flags:
                failures.append(name)


def stats():
    fn = getattr(ctypes.CDLL(None), "pycomm_preload_stats", None)
    if fn is None:
        return f"stats rank {RANK} no-preload"
    engine, passed = ctypes.c_ulonglong(), ctypes.c_ulonglong()
    fn(ctypes.byref(engine), ctypes.byref(passed))
    return f"stats rank {RANK} engine {engine.value} passthrough {passed.value}"


def main():
    dup = world.Dup()
    halves = world.Split(RANK % 2, RANK)
    for comm, label in ((world, "world"), (dup, "dup"), (halves, "split")):
        check(comm, label)
        check_random_floats(comm, label)
    dup.Free()
    halves.Free()
    if "--with-pycomm" in sys.argv:
        check_pycomm()
    summarise()
    emit(stats())
    failed = world.allreduce(len(failures), op=MPI.MAX)
    sys.exit(1 if failed else 0)


main()
