"""Correctness of every collective against a numpy reference; run under mpirun by the tests.

usage: collectives.py MODE [DTYPE ...]
"""

import sys
import types

import numpy as np
from common import (
    DLPackOnly,
    Failures,
    dtype_op_cases,
    make_input,
    matches,
    np_dtype,
    reference,
    same_on_all_ranks,
)
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank
# Sizes: empty, one element, fewer elements than ranks, primes, not divisible by P, and several
# chunks of every chunk size used below.
SIZES = sorted({0, 1, 2, 3, P - 1, P + 1, 7, 13, 97, 1000, 4099})
# 8 bytes is one element of the widest type: the most chunks, the most pipeline edge cases.
CHUNKS = (8, 64, 1 << 20)


def check_allreduce(comm, dtypes, failures):
    for name, dtype, op in dtype_op_cases(dtypes):
        for n in SIZES:
            inputs = [make_input(q, n, dtype, op) for q in range(P)]
            x = inputs[RANK].copy()
            case = f"allreduce {name} {op} n={n} chunk={comm.chunk_bytes}"
            y = comm.allreduce(x, op=op)
            failures.check(matches(y, inputs, dtype, op), f"{case} out-of-place: {y[:4]}")
            failures.check(np.array_equal(x.view(np.uint8), inputs[RANK].view(np.uint8)), f"{case}: x modified")
            failures.check(same_on_all_ranks(y), f"{case}: ranks differ")
            out = np.full_like(x, 7)
            comm.allreduce(x, op=op, out=out)
            failures.check(np.array_equal(out.view(np.uint8), y.view(np.uint8)), f"{case} out=: differs")
            comm.allreduce(x, op=op, out=x)
            failures.check(np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{case} in place: differs")
            # Shapes other than 1-D reduce the same elements.
            if n == 1000:
                z = comm.allreduce(inputs[RANK].reshape(10, 4, 25), op=op)
                failures.check(
                    z.shape == (10, 4, 25) and np.array_equal(z.ravel().view(np.uint8), y.view(np.uint8)),
                    f"{case}: 3-d differs",
                )


def check_other_collectives(comm, dtypes, failures):
    for name in dtypes:
        dtype = np_dtype(name)
        for rows in (0, 1, 5, 33):
            # reduce_scatter: this rank gets block RANK of the reduction.
            for op in ("sum", "max") + (("avg",) if dtype.kind == "f" or name == "bfloat16" else ()):
                inputs = [make_input(q, rows * P * 3, dtype, op).reshape(rows * P, 3) for q in range(P)]
                block = comm.reduce_scatter(inputs[RANK], op=op)
                full = reference([x.ravel() for x in inputs], dtype, op).reshape(rows * P, 3)
                want = full[RANK * rows : (RANK + 1) * rows]
                ok = block.shape == (rows, 3) and matches_block(block, inputs, dtype, op, rows)
                failures.check(ok, f"reduce_scatter {name} {op} rows={rows}: {block.ravel()[:4]} vs {want.ravel()[:4]}")
                # In place (NCCL's form): out is this rank's block of x; the same bits as above.
                x = inputs[RANK].copy()
                own = x[RANK * rows : (RANK + 1) * rows]
                result = comm.reduce_scatter(x, op=op, out=own)
                failures.check(
                    result is own and np.array_equal(own.view(np.uint8), block.view(np.uint8)),
                    f"reduce_scatter {name} {op} rows={rows} in place",
                )
            # allgather: every rank's block, in rank order.
            x = make_input(RANK, rows * 2, dtype, "sum").reshape(rows, 2)
            gathered = comm.allgather(x)
            want = np.concatenate([make_input(q, rows * 2, dtype, "sum").reshape(rows, 2) for q in range(P)])
            failures.check(
                np.array_equal(gathered.view(np.uint8), want.view(np.uint8)), f"allgather {name} rows={rows}"
            )
            # In place: x is this rank's block of out; the other blocks start as garbage.
            out = np.full_like(want, 3)
            out[RANK * rows : (RANK + 1) * rows] = x
            result = comm.allgather(out[RANK * rows : (RANK + 1) * rows], out=out)
            failures.check(
                result is out and np.array_equal(out.view(np.uint8), want.view(np.uint8)),
                f"allgather {name} rows={rows} in place",
            )
        for root in range(P):
            for n in (0, 1, 100, 5000):
                buf = make_input(RANK + 10, n, dtype, "sum")
                comm.broadcast(buf, root=root)
                want = make_input(root + 10, n, dtype, "sum")
                failures.check(
                    np.array_equal(buf.view(np.uint8), want.view(np.uint8)), f"broadcast {name} root={root} n={n}"
                )
    g = comm.allgather(np.array(RANK, np.int64))
    failures.check(g.tolist() == list(range(P)), f"allgather of 0-d: {g}")
    comm.barrier()


def check_in_place_fast_paths(comm, failures):
    """NCCL's in-place forms of plain numpy arrays take the native fast paths: with only those
    left on the communicator, the full path's first native call would raise AttributeError."""
    native, rows = comm._native, 4
    comm._native = types.SimpleNamespace(
        rank=native.rank,
        size=native.size,
        reduce_scatter_if_plain=native.reduce_scatter_if_plain,
        allgather_if_plain=native.allgather_if_plain,
    )
    try:
        x = np.arange(rows * P, dtype=np.float32)
        own = x[RANK * rows : (RANK + 1) * rows]
        comm.reduce_scatter(x, out=own)
        want = P * np.arange(RANK * rows, (RANK + 1) * rows)
        failures.check(np.array_equal(own, want), "fast in-place reduce_scatter")
        out = np.zeros(rows * P, np.float32)
        out[RANK * rows : (RANK + 1) * rows] = RANK
        comm.allgather(out[RANK * rows : (RANK + 1) * rows], out=out)
        failures.check(np.array_equal(out, np.repeat(np.arange(P), rows)), "fast in-place allgather")
    except AttributeError as error:
        failures.check(False, f"an in-place call left the fast path: {error}")
    finally:
        comm._native = native


def matches_block(block, inputs, dtype, op, rows):
    parts = [x[RANK * rows : (RANK + 1) * rows].ravel() for x in inputs]
    return matches(block.ravel(), parts, dtype, op)


def check_stress(comm, failures):
    """200 back-to-back calls of mixed sizes, dtypes and ops, then async calls waited in reverse."""
    rng = np.random.default_rng(1)
    for i in range(200):
        n = int(rng.choice([1, 3, 50, 1000, 20000, 300000]))
        name = str(rng.choice(["float32", "int32", "float64", "bfloat16"]))
        op = "sum" if i % 3 else "max"
        dtype = np_dtype(name)
        inputs = [make_input(q, n, dtype, op, seed=i) for q in range(P)]
        y = comm.allreduce(inputs[RANK], op=op)
        failures.check(matches(y, inputs, dtype, op), f"stress call {i}: {name} {op} n={n}")
    works = []
    for i in range(8):
        n = 1000 * (i + 1) + i
        inputs = [make_input(q, n, np.dtype(np.float32), "sum", seed=100 + i) for q in range(P)]
        out = np.empty(n, np.float32)
        works.append((comm.allreduce_async(inputs[RANK], op="sum", out=out), out, inputs))
    # A blocking call issued behind the async ones must run after them.
    y = comm.allreduce(np.full(5, RANK + 1.0))
    failures.check(np.array_equal(y, np.full(5, P * (P + 1) / 2)), "blocking call after async ones")
    for work, out, inputs in reversed(works):
        failures.check(work.done(), "async work not done after a later blocking call returned")
        failures.check(work.wait() is out and matches(out, inputs, np.dtype(np.float32), "sum"), "async result")
    works = [comm.allreduce_async(np.full(100, float(RANK + i)), op="max") for i in range(6)]
    for i, work in reversed(list(enumerate(works))):
        failures.check(np.array_equal(work.wait(), np.full(100, float(P - 1 + i))), f"async max #{i}")


def check_back_to_back(comm, failures):
    """Small calls right after each other, each of another size: a rank that starts the next call
    while a peer still copies the last result out must not overwrite what the peer reads."""
    for i in range(400):
        n = 1 + (i * 7919) % 61
        y = comm.allreduce(np.full(n, float(RANK + i)))
        expected = sum(q + i for q in range(P))
        failures.check(bool(np.all(y == expected)), f"back-to-back call {i} (n={n}): {y[:3]}, expected {expected}")


def check_dlpack_host(comm, failures):
    """Arrays that speak only DLPack, in host memory: every collective gives what it gives for
    the numpy arrays behind them, as numpy arrays (out of place) or in their memory."""

    def same(a, b) -> bool:
        return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))

    for name in ("float32", "float16", "int64"):  # numpy cannot export ml_dtypes' bfloat16 through DLPack
        dtype = np_dtype(name)
        for n in (0, 1, 7, 1000, 4099):
            case = f"dlpack {name} n={n}"
            inputs = [make_input(q, n, dtype, "sum") for q in range(P)]
            want = comm.allreduce(inputs[RANK])
            x = inputs[RANK].copy()
            y = comm.allreduce(DLPackOnly(x))
            failures.check(type(y) is np.ndarray and same(y, want), f"{case} out of place")
            failures.check(same(x, inputs[RANK]), f"{case}: x modified")
            out = np.full_like(x, 7)
            failures.check(comm.allreduce(DLPackOnly(x), out=DLPackOnly(out)).array is out, f"{case} out= result")
            failures.check(same(out, want), f"{case} out=")
            wrapped = DLPackOnly(x)
            comm.allreduce(wrapped, out=wrapped)
            failures.check(same(x, want), f"{case} in place")
            y = comm.allreduce_async(DLPackOnly(inputs[RANK])).wait()
            failures.check(type(y) is np.ndarray and same(y, want), f"{case} async")
        for rows in (0, 1, 5):
            x = make_input(RANK, rows * P * 3, dtype, "sum").reshape(rows * P, 3)
            block = comm.reduce_scatter(DLPackOnly(x))
            failures.check(
                type(block) is np.ndarray and same(block, comm.reduce_scatter(x)), f"dlpack rs {name} {rows}"
            )
            gathered = comm.allgather(DLPackOnly(x[:rows]))
            want = comm.allgather(x[:rows])
            failures.check(type(gathered) is np.ndarray and same(gathered, want), f"dlpack allgather {name} {rows}")
        for root in range(P):
            buf = make_input(RANK + 10, 1000, dtype, "sum")
            wrapped = DLPackOnly(buf)
            failures.check(comm.broadcast(wrapped, root=root) is wrapped, f"dlpack broadcast {name} result")
            failures.check(same(buf, make_input(root + 10, 1000, dtype, "sum")), f"dlpack broadcast {name} {root}")


def check_large_count(failures):
    """More than 2**31 elements: neither MPI's int counts nor any int in the engine may truncate."""
    n = 2**31 + 3
    comm = pycomm.Communicator(chunk_bytes=64 << 20)
    x = np.ones(n, np.int8)
    x[-1] = RANK + 1
    comm.allreduce(x, out=x)
    failures.check(bool(x[0] == P and x[2**31] == P), f"large allreduce head {x[:2]} / past 2**31 {x[2**31]}")
    failures.check(int(x[-1]) == P * (P + 1) // 2, f"large allreduce tail {x[-1]}")
    # Checked in pieces: a full np.all over 2 GiB would double peak memory.
    head = x[: n - 1]
    bad = sum(int(np.count_nonzero(head[i : i + (1 << 28)] != P)) for i in range(0, n - 1, 1 << 28))
    failures.check(bad == 0, f"large allreduce: {bad} wrong elements")
    comm.close()


def check_shared_buffers(failures):
    """Arrays from comm.empty, reduced in place above the one-shot's range (no copies), and every
    case where a rank does not qualify (plain array, out of place, another offset): all ranks must
    then agree to take another algorithm, with the same results."""
    comm = pycomm.Communicator()
    for name, dtype, op in dtype_op_cases(pycomm.SUPPORTED_DTYPES):
        for n in (200_003, 1_000_000):
            inputs = [make_input(q, n, dtype, op) for q in range(P)]
            case = f"shared {name} {op} n={n}"
            buf = comm.empty(n, dtype)
            buf[...] = inputs[RANK]
            comm.allreduce(buf, op=op, out=buf)
            failures.check(matches(buf, inputs, dtype, op), f"{case}: {buf[:4]}")
            failures.check(same_on_all_ranks(buf), f"{case}: ranks differ")
    n = 300_000
    dtype = np.dtype(np.float32)
    inputs = [make_input(q, n, dtype, "sum", seed=7) for q in range(P)]
    last = P - 1
    for label in ("rank 0 passes a plain array", f"rank {last} uses another offset"):
        buf = comm.empty(n + 8, dtype)
        offset = 8 if label.startswith(f"rank {last}") and RANK == last else 0
        x = buf[offset : offset + n]
        if label.startswith("rank 0") and RANK == 0:
            x = np.empty(n, dtype)
        x[...] = inputs[RANK]
        comm.allreduce(x, out=x)
        failures.check(matches(x, inputs, dtype, "sum"), f"{label}: {x[:4]}")
        failures.check(same_on_all_ranks(x), f"{label}: ranks differ")
    buf = comm.empty(n, np.float32)
    buf[...] = RANK + 1
    y = comm.allreduce(buf)  # out of place: copies as usual, buf untouched
    failures.check(bool(np.all(y == P * (P + 1) / 2)) and bool(np.all(buf == RANK + 1)), "shared, out of place")
    comm.close()


def check_singlecopy_fallback(failures):
    """PYCOMM_CMA=0 on the last rank only: all ranks agree to run the ring, and keep to it (also
    for reduce_scatter and allgather; broadcast takes the chain)."""
    import os

    if RANK == P - 1:
        os.environ["PYCOMM_CMA"] = "0"
    for algorithm in ("singlecopy", "auto"):
        with pycomm.Communicator(algorithm=algorithm, debug=True, chunk_bytes=4096) as comm:
            for n in (1, 1000, 300_001):
                for op in ("sum", "max"):
                    inputs = [make_input(q, n, np.dtype(np.float32), op) for q in range(P)]
                    y = comm.allreduce(inputs[RANK], op=op)
                    failures.check(matches(y, inputs, np.dtype(np.float32), op), f"{algorithm} {op} n={n}: {y[:4]}")
                    failures.check(same_on_all_ranks(y), f"{algorithm} {op} n={n}: ranks differ")
            # Reduce-scatter and allgather go the same way.
            block = comm.reduce_scatter(np.full((P * 5, 3), RANK + 1, np.float32))
            failures.check(block.shape == (5, 3) and bool(np.all(block == P * (P + 1) // 2)), f"reduce_scatter {block}")
            rows = comm.allgather(np.full(4, RANK, np.int64))
            failures.check(np.array_equal(rows, np.repeat(np.arange(P), 4)), f"allgather {rows}")
            # And broadcast, above its one-shot: the chain where single-copy cannot run.
            for n in (3, 300_001):
                got = comm.broadcast(np.full(n, RANK, np.float64), root=P - 1)
                failures.check(bool(np.all(got == P - 1)), f"{algorithm} broadcast n={n}: {got[:4]}")


def main():
    mode, dtypes = sys.argv[1], sys.argv[2:] or list(pycomm.SUPPORTED_DTYPES)
    failures = Failures()
    if mode == "allreduce":
        for chunk in CHUNKS:
            with pycomm.Communicator(chunk_bytes=chunk) as comm:
                check_allreduce(comm, dtypes, failures)
    elif mode == "others":
        for chunk in (8, 1 << 20):
            with pycomm.Communicator(chunk_bytes=chunk) as comm:
                check_other_collectives(comm, dtypes, failures)
                check_in_place_fast_paths(comm, failures)
    elif mode == "dlpack":
        with pycomm.Communicator() as comm:
            check_dlpack_host(comm, failures)
    elif mode == "stress":
        with pycomm.Communicator(chunk_bytes=4096) as comm:
            check_stress(comm, failures)
    elif mode == "back-to-back":
        with pycomm.Communicator() as comm:
            check_back_to_back(comm, failures)
    elif mode == "shared":
        check_shared_buffers(failures)
    elif mode == "singlecopy-fallback":
        check_singlecopy_fallback(failures)
    elif mode == "large":
        check_large_count(failures)
    else:
        raise SystemExit(f"unknown mode {mode}")
    failures.finish()


if __name__ == "__main__":
    main()
