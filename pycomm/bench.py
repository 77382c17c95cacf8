"""Collective benchmark in the manner of nccl-tests' all_reduce_perf (and, with --collective,
reduce_scatter_perf, all_gather_perf and broadcast_perf).

    mpirun -n 2 python -m pycomm.bench -b 8 -e 256M -f 2 --vs mpi
    mpirun -n 2 python -m pycomm.bench --device gpu -b 8 -e 256M --vs mpi
    mpirun -n 4 python -m pycomm.bench --collective allgather --vs mpi

Every rank runs the same sweep; rank 0 prints the table. Each size is checked against the exact
expected result before it is timed, so a fast but wrong engine cannot pass unnoticed (#wrong), and
`--vs mpi` times MPI_Allreduce on the same buffers in the same run, because a speed-up only means
something against a baseline measured side by side (MPI's own collective: MPI_Allreduce,
MPI_Reduce_scatter_block, MPI_Allgather, MPI_Bcast). With `--device gpu` the buffers are cupy or
torch arrays on each rank's GPU, every timed loop ends when its GPU work has, and `--vs mpi` times
what a program without pycomm does with them: copy to the host, the MPI call, copy back. See
bench/README.md.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from fractions import Fraction

import ml_dtypes
import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

import pycomm
from pycomm.bench_collectives import COLLECTIVES, PERIOD
from pycomm.bench_gpu import LIBRARIES, GpuArrays, GpuUnavailable
from pycomm.dtypes import is_floating
from pycomm.ops import ReduceOp, parse_op
from pycomm.settings import ALGORITHMS, parse_size

# Adaptive iteration counts aim at this much timed work per size and repeat.
TARGET_SECONDS = 0.25
PROBE_SECONDS = 0.02
MIN_ITERS = 5
MAX_ITERS = 1000
# Per rank, for the memory-bandwidth floor: far larger than any cache (a GPU's L2 included).
FLOOR_COPY_BYTES = 64 << 20
FLOOR_DEVICE_COPY_BYTES = 256 << 20  # a GPU copies 64 MiB in tens of microseconds: less noise
# Copies queued back to back per timing of a GPU's floor. Where ranks share one GPU, each timing
# also pays the switches between their contexts (~140 us each on an H200): with one 256 MiB copy
# per rank and timing, the CLI measured 1935 GB/s where bench/gpu_allreduce.py, timing 20, measured
# 3617 GB/s in the same check (bench/results/2026-11-27-h200-gpu-recheck.md).
FLOOR_DEVICE_COPIES = 20

# Fill and check in blocks of whole periods, so checking needs no full-size temporary arrays.
BLOCK_ELEMS = PERIOD * (1 << 15)

_MPI_OPS = {
    ReduceOp.SUM: MPI.SUM,
    ReduceOp.PROD: MPI.PROD,
    ReduceOp.MIN: MPI.MIN,
    ReduceOp.MAX: MPI.MAX,
    ReduceOp.AVG: MPI.SUM,  # MPI has no average; its sum does the same communication
}


# -- expected values ---------------------------------------------------------------------------


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _exact_bound(dtype: np.dtype) -> int:
    """Largest B such that every integer of magnitude up to B is exact in dtype."""
    if is_floating(dtype):
        return 2 ** (ml_dtypes.finfo(dtype).nmant + 1)
    info = np.iinfo(dtype)
    return int(info.max) if info.min == 0 else min(int(info.max), -int(info.min))


def _is_exact(value, dtype: np.dtype) -> bool:
    stored = np.array([float(value)]).astype(dtype)[0]
    return Fraction(value) == Fraction(float(stored) if is_floating(dtype) else int(stored))


def _candidates(op: ReduceOp, signed: bool, size: int):
    """Input rules value(rank, phase), richest first; the first whose result is exact is used.

    Values are small integers that depend on the rank and on the position along the array, so
    every partial result of any reduction order is exact and a wrong rank, offset or operator
    shows up as a wrong element.
    """
    if op in (ReduceOp.MIN, ReduceOp.MAX):
        yield lambda r, a: (a + 3 * r) % PERIOD - (3 if signed else 0)
    elif op == ReduceOp.PROD:
        yield lambda r, a: 2 if (a + r) % 3 == 0 else (-1 if signed and (a + 2 * r) % 5 == 0 else 1)
        yield lambda r, a: 2 if r == a else 1
    elif op == ReduceOp.AVG:
        yield lambda r, a: a + (a + r) % size - 3  # sums to size * (a - 3) + size * (size - 1) / 2
        yield lambda r, a: a - 3
    else:
        for m in range(PERIOD, 1, -1):
            yield lambda r, a, m=m: (a + r) % m - (m // 2 if signed else 0)
    yield lambda r, a: 1 if op == ReduceOp.PROD else 0


def _reduce_exact(op: ReduceOp, values: list):
    if op == ReduceOp.PROD:
        return math.prod(values)
    if op == ReduceOp.MIN:
        return min(values)
    if op == ReduceOp.MAX:
        return max(values)
    if op == ReduceOp.AVG:
        return Fraction(sum(values), len(values))
    return sum(values)


def input_tables(op: ReduceOp, dtype: np.dtype, size: int, rank: int):
    """Returns (this rank's input over one period, the exact result over one period)."""
    bound = _exact_bound(dtype)
    signed = not dtype.name.startswith("uint")
    for rule in _candidates(op, signed, size):
        ok = True
        mine, expected = [], []
        for a in range(PERIOD):
            values = [rule(r, a) for r in range(size)]
            # Magnitudes bound every partial result, whatever order the engine reduces in.
            magnitudes = [abs(v) for v in values]
            if op == ReduceOp.PROD:
                worst = math.prod(magnitudes)
            elif op in (ReduceOp.MIN, ReduceOp.MAX):
                worst = max(magnitudes)
            else:
                worst = sum(magnitudes)
            result = _reduce_exact(op, values)
            if worst > bound or not _is_exact(result, dtype):
                ok = False
                break
            mine.append(values[rank])
            expected.append(float(result) if is_floating(dtype) else int(result))
        if ok:
            return np.array(mine, dtype=dtype), np.array(expected, dtype=dtype)
    raise AssertionError("unreachable: the last candidate is constant")


def fill_periodic(buf: np.ndarray, table: np.ndarray) -> None:
    block = np.resize(table, min(BLOCK_ELEMS, buf.size))
    for start in range(0, buf.size, BLOCK_ELEMS):
        part = buf[start : start + BLOCK_ELEMS]
        part[...] = block[: part.size]


def count_wrong(buf: np.ndarray, table: np.ndarray) -> int:
    block = np.resize(table, min(BLOCK_ELEMS, buf.size))
    wrong = 0
    for start in range(0, buf.size, BLOCK_ELEMS):
        part = buf[start : start + BLOCK_ELEMS]
        wrong += int(np.count_nonzero(part != block[: part.size]))
    return wrong


# -- timing ------------------------------------------------------------------------------------


def time_calls(call, iters: int, world, synchronize=None) -> float:
    """Seconds per call of the slowest rank: a collective is only done when its last rank is (and,
    on a GPU, when the work it queued has run: `synchronize` waits for it)."""
    world.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if synchronize:
        synchronize()
    per_call = (time.perf_counter() - start) / iters
    return world.allreduce(per_call, op=MPI.MAX)


def choose_iters(call, world, synchronize=None) -> int:
    """Extrapolates from a short probe. Rank 0 decides and broadcasts, because every rank must
    make the same number of calls or the collectives stop matching."""
    n = 1
    while True:
        per_call = time_calls(call, n, world, synchronize)
        if per_call * n >= PROBE_SECONDS or n >= MAX_ITERS:
            break
        n *= 4
    iters = None
    if world.rank == 0:
        iters = int(min(MAX_ITERS, max(MIN_ITERS, TARGET_SECONDS / max(per_call, 1e-9))))
    return world.bcast(iters, root=0)


def default_warmup(iters: int) -> int:
    return max(1, iters // 10)


class Measurement:
    """One engine's calls on one size: iteration count, warm-up, and the per-repeat times."""

    def __init__(self, call, args, world, synchronize=None):
        self.call = call
        self.synchronize = synchronize
        self.iters = args.iters or choose_iters(call, world, synchronize)
        self.warmup = args.warmup if args.warmup is not None else default_warmup(self.iters)
        self.times = []

    def warm(self) -> None:
        for _ in range(self.warmup):
            self.call()
        if self.synchronize:
            self.synchronize()

    def repeat(self, world) -> None:
        self.times.append(time_calls(self.call, self.iters, world, self.synchronize))

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def node_memory_bandwidth(node, copy=None) -> float:
    """Bytes read + written per second by every rank of this node copying a large buffer at once
    (the median of 3): the memory traffic an allreduce on this node can reach at best. In host
    memory, or through `copy` = (function, bytes): the function copies that many bytes (on this
    rank's GPU, say) and returns once they are copied. Ranks that share a memory (one GPU, one
    host) share its bandwidth here as they do in an allreduce."""
    if copy is None:
        src = np.ones(FLOOR_COPY_BYTES, np.uint8)
        dst = np.empty_like(src)
        copy = (lambda: np.copyto(dst, src), src.nbytes)
    run, nbytes = copy
    run()  # touch the pages outside the timing
    times = []
    for _ in range(3):
        node.Barrier()
        start = time.perf_counter()
        run()
        times.append(node.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return node.size * 2 * nbytes / statistics.median(times)


def floor_busbw(memory_bw: float, local_size: int, collective) -> float:
    """busbw of a collective that reads each input once and writes each output once: each of the
    node's ranks moves collective.traffic() bytes of memory traffic per byte of the size (2 for
    an allreduce)."""
    return memory_bw / (collective.traffic() * local_size) * collective.bus_factor()


def mpi_has_dtype(dtype: np.dtype) -> bool:
    try:
        from_numpy_dtype(dtype)
    except (ValueError, KeyError, TypeError):
        return False
    return True


# -- the sweep ---------------------------------------------------------------------------------


def sizes_in_elements(args, itemsize: int, multiple: int = 1) -> list:
    """Element counts of the sweep's sizes, each rounded down to a multiple of `multiple` (the
    ranks, where a size is cut into a block per rank, as nccl-tests does)."""
    counts, size = [], args.min_bytes
    while size <= args.max_bytes:
        count = size // itemsize // multiple * multiple
        if count and (not counts or count != counts[-1]):  # smaller than one element (block): skip
            counts.append(count)
        size = max(size + 1, int(size * args.factor))
    return counts


class HostBuffers:
    """The sweep's buffers in host memory: numpy arrays, or comm.empty's shared memory."""

    synchronize = None  # host calls are done when they return

    def __init__(self, comm, shared: bool):
        self.comm, self.shared = comm, shared

    def empty(self, count: int, dtype: np.dtype):
        return self.comm.empty(count, dtype) if self.shared else np.empty(count, dtype)

    def fill(self, buf, table: np.ndarray) -> None:
        fill_periodic(buf, table)

    def wrong(self, buf, table: np.ndarray) -> int:
        return count_wrong(buf, table)

    def mpi_call(self, world, collective, x, y, mpi_op, in_place: bool):
        """(MPI's call on x and y, where it leaves its result)."""
        if in_place:
            return lambda: collective.mpi_in_place_call(world, x, y, mpi_op), collective.mpi_in_place_result(x, y)
        return lambda: collective.mpi_call(world, x, y, mpi_op), y

    def floor_copy(self):
        return None  # node_memory_bandwidth copies in host memory itself


class DeviceBuffers:
    """The sweep's buffers on this rank's GPU (bench_gpu.GpuArrays), filled and checked through
    host copies."""

    def __init__(self, gpu, dtype: np.dtype):
        self.gpu, self.dtype = gpu, dtype
        self.synchronize = gpu.synchronize

    def floor_copy(self):
        """For node_memory_bandwidth: FLOOR_DEVICE_COPIES copies on this rank's GPU, waited for
        once. Its buffers go with the measurement, back to the library's pool for the sweep's
        arrays (ranks sharing a GPU each hold two meanwhile)."""
        dst, src = (self.gpu.empty(FLOOR_DEVICE_COPY_BYTES, np.dtype(np.uint8)) for _ in range(2))

        def run():
            for _ in range(FLOOR_DEVICE_COPIES):
                self.gpu.copy(dst, src)
            self.gpu.synchronize()

        return run, FLOOR_DEVICE_COPIES * FLOOR_DEVICE_COPY_BYTES

    def empty(self, count: int, dtype: np.dtype):
        return self.gpu.empty(count, dtype)

    def fill(self, buf, table: np.ndarray) -> None:
        host = np.empty(len(buf), self.dtype)
        fill_periodic(host, table)
        self.gpu.upload(host, buf)

    def wrong(self, buf, table: np.ndarray) -> int:
        return count_wrong(self.gpu.download(buf, self.dtype), table)

    def mpi_call(self, world, collective, x, y, mpi_op, in_place: bool):
        """(MPI's call on x and y through host copies, where it leaves its result: y)."""

        # What a program does without pycomm (and without a CUDA-aware MPI): the copies count.
        def staged():
            host = self.gpu.download(x, self.dtype)
            self.gpu.upload(collective.mpi_staged(world, host, len(y), mpi_op), y)

        return staged, y


def run_size(count, args, collective, op, comm, world, mpi_ok, also=None, node=None, buffers=None) -> dict:
    """Checks and times one size (`count` elements: the larger buffer's, as nccl-tests counts)."""
    dtype = collective.dtype
    # Buffers live for one size only, so at most two max-size arrays exist per rank.
    # --shared: the buffers live in comm.empty memory (in place), as a training loop's gradient
    # buckets would; MPI then works on the same arrays.
    buffers = buffers or HostBuffers(comm, args.shared)
    sync = buffers.synchronize
    if args.in_place:
        x, y = collective.in_place(buffers.empty(max(collective.counts(count)), dtype))
    else:
        x, y = (buffers.empty(n, dtype) for n in collective.counts(count))

    def fill() -> None:
        for begin, end, table in collective.input_parts(count):
            buffers.fill(x[begin:end], table)

    def wrong(result) -> int:
        found = sum(buffers.wrong(result[begin:end], table) for begin, end, table in collective.result_parts(count))
        return world.allreduce(found, op=MPI.SUM)

    def pycomm_call():
        collective.call(comm, x, y, op)

    mpi_call, mpi_result = buffers.mpi_call(world, collective, x, y, _MPI_OPS[op], args.in_place)

    # Correctness first, on freshly filled inputs; in place, the timed loops overwrite them.
    fill()
    pycomm_call()
    wrong_elements = wrong(y) if args.check else None
    engines = {"pycomm": Measurement(pycomm_call, args, world, sync)}

    mpi_wrong = None
    if mpi_ok:
        fill()
        mpi_call()
        if args.check and op != ReduceOp.AVG:
            mpi_wrong = wrong(mpi_result)
        engines["mpi"] = Measurement(mpi_call, args, world, sync)

    # --also: the same buffers through communicators forced to other algorithms.
    also_wrong = {}
    for name, other in (also or {}).items():

        def other_call(other=other):
            collective.call(other, x, y, op)

        fill()
        other_call()
        also_wrong[name] = wrong(y) if args.check else None
        engines[name] = Measurement(other_call, args, world, sync)

    for engine in engines.values():
        engine.warm()
    # The floor is measured next to each size: a noisy neighbour can halve memory bandwidth for
    # a minute.
    memory_bw = node_memory_bandwidth(node, buffers.floor_copy()) if node is not None else None
    # Alternating the engines within each repeat spreads any drift of the machine over both.
    for _ in range(args.repeats):
        for engine in engines.values():
            engine.repeat(world)

    nbytes = count * dtype.itemsize
    factor = collective.bus_factor()
    seconds = engines["pycomm"].seconds
    row = {
        "size": nbytes,
        "count": count,
        "type": args.dtype,
        "redop": op.name.lower() if collective.reduces else "none",
        "time_us": seconds * 1e6,
        "algbw": nbytes / seconds / 1e9,
        "busbw": nbytes / seconds / 1e9 * factor,
        "wrong": wrong_elements,
        "iters": engines["pycomm"].iters,
        "warmup": engines["pycomm"].warmup,
        "times_us": [t * 1e6 for t in engines["pycomm"].times],
    }
    if memory_bw is not None:
        row["memory_bw"] = memory_bw / 1e9
        row["floor_busbw"] = floor_busbw(memory_bw, node.size, collective) / 1e9
    if "mpi" in engines:
        mpi_seconds = engines["mpi"].seconds
        row.update(
            mpi_time_us=mpi_seconds * 1e6,
            mpi_algbw=nbytes / mpi_seconds / 1e9,
            mpi_busbw=nbytes / mpi_seconds / 1e9 * factor,
            # Equals busbw / mpi_busbw, and stays defined at P=1 where both busbw are 0.
            ratio=mpi_seconds / seconds,
            mpi_wrong=mpi_wrong,
            mpi_iters=engines["mpi"].iters,
            mpi_times_us=[t * 1e6 for t in engines["mpi"].times],
        )
    for name in also or {}:
        other_seconds = engines[name].seconds
        row.setdefault("also", {})[name] = {
            "time_us": other_seconds * 1e6,
            "algbw": nbytes / other_seconds / 1e9,
            "busbw": nbytes / other_seconds / 1e9 * factor,
            "wrong": also_wrong[name],
            # How many times faster the main communicator is.
            "ratio": other_seconds / seconds,
            "times_us": [t * 1e6 for t in engines[name].times],
        }
    if world.rank == 0:
        print(format_row(row, args), flush=True)
    return row


# -- output ------------------------------------------------------------------------------------

_COLUMNS = "{:>12} {:>12} {:>8} {:>6} {:>10} {:>11} {:>11} {:>7}"
_MPI_COLUMNS = " {:>12} {:>10} {:>7}"
_ALSO_COLUMNS = " {:>14} {:>9}"
_FLOOR_COLUMNS = " {:>12} {:>7}"


def format_header(args) -> str:
    names = ["size(B)", "count", "type", "redop", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"]
    line = "#" + _COLUMNS.format(*names)[1:]
    if args.vs == "mpi":
        line += _MPI_COLUMNS.format("mpi_time(us)", "mpi_busbw", "ratio")
    for name in args.also:
        line += _ALSO_COLUMNS.format(f"{name}(us)", f"vs_{name}")
    if args.floor:
        line += _FLOOR_COLUMNS.format("floor_busbw", "%floor")
    return line


def format_row(row: dict, args) -> str:
    wrong = "N/A" if row["wrong"] is None else str(row["wrong"])
    line = _COLUMNS.format(
        row["size"],
        row["count"],
        row["type"],
        row["redop"],
        f"{row['time_us']:.2f}",
        f"{row['algbw']:.3f}",
        f"{row['busbw']:.3f}",
        wrong,
    )
    if args.vs == "mpi":
        if "mpi_time_us" in row:
            line += _MPI_COLUMNS.format(f"{row['mpi_time_us']:.2f}", f"{row['mpi_busbw']:.3f}", f"{row['ratio']:.2f}")
        else:
            line += _MPI_COLUMNS.format("N/A", "N/A", "N/A")
    for name in args.also:
        other = row["also"][name]
        line += _ALSO_COLUMNS.format(f"{other['time_us']:.2f}", f"{other['ratio']:.2f}")
    if args.floor:
        floor = row.get("floor_busbw")
        percent = f"{100 * row['busbw'] / floor:.0f}" if floor else "N/A"
        line += _FLOOR_COLUMNS.format(f"{floor:.3f}" if floor is not None else "N/A", percent)
    return line


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(args, argv, comm, world) -> dict:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "P": world.size,
        "command": f"mpirun -n {world.size} python -m pycomm.bench {shlex.join(argv)}".rstrip(),
        "argv": sys.argv,
        "build_mpi": pycomm.BUILD_MPI,
        "runtime_mpi": pycomm.RUNTIME_MPI,
        "pycomm_version": pycomm.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "nproc": len(affinity) if affinity is not None else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "chunk_bytes": comm.chunk_bytes,
        "algorithm": comm.algorithm,
        "inter_node": comm.inter_node,
        "also": args.also,
        # How the ranks were laid out and any pycomm / MPI settings in force.
        "local_size": comm.local_size,
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("PYCOMM_", "MPIR_CVAR_"))},
        "collective": args.collective,
        "dtype": args.dtype,
        "op": args.op,
        "root": args.root if COLLECTIVES[args.collective].rooted else None,
        "in_place": args.in_place,
        "device": args.device,
        "check": args.check,
        "vs": args.vs,
        "repeats": args.repeats,
    }


def write_plot(path: str, rows: list, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on compute nodes
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# --plot: matplotlib is not installed, so {path} was not written (pip install matplotlib)")
        return
    # At P=1 busbw is 0 by definition; algbw is the only informative curve there.
    key = "busbw" if meta["P"] > 1 else "algbw"
    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = [row["size"] for row in rows]
    ax.plot(sizes, [row[key] for row in rows], marker="o", label="pycomm")
    for name in rows[0].get("also", {}) if rows else ():
        ax.plot(sizes, [row["also"][name][key] for row in rows], marker=".", label=f"pycomm {name}")
    floor_rows = [row for row in rows if row.get("floor_busbw") and key == "busbw"]
    if floor_rows:
        floors = [row["floor_busbw"] for row in floor_rows]
        ax.plot([row["size"] for row in floor_rows], floors, linestyle="--", color="gray", label="memory floor")
    mpi_rows = [row for row in rows if f"mpi_{key}" in row]
    if mpi_rows:
        ax.plot([row["size"] for row in mpi_rows], [row[f"mpi_{key}"] for row in mpi_rows], marker="s", label="MPI")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel(f"{key} (GB/s)")
    what = " ".join(str(meta[k]) for k in ("collective", "dtype", "op") if meta[k] is not None)
    ax.set_title(f"{what}, P={meta['P']}, {meta['hostname']}, {meta['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# plot written to {path}")


# -- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Prints help and errors on rank 0 only, so P ranks do not print P copies."""

    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.rank == 0:
            super()._print_message(message, file)


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return size


def _algorithm_list(text: str) -> list:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in ALGORITHMS:
            raise argparse.ArgumentTypeError(f"unknown algorithm {name!r} (one of {', '.join(ALGORITHMS)})")
    return names


_NCCL_TYPE_NAMES = {"half": "float16", "float": "float32", "double": "float64"}


def _dtype_arg(text: str) -> str:
    return _NCCL_TYPE_NAMES.get(text, text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pycomm.bench",
        description="Times one of pycomm's collectives over a range of sizes (run under mpirun -n P).",
    )
    # Short options as nccl-tests spells them (-b -e -f -d -o -r -n -w), so its users' commands
    # carry over; nccl-tests has a program per collective, so --collective has no short form
    # (its -c is the check).
    parser.add_argument(
        "--collective",
        choices=list(COLLECTIVES),
        default="allreduce",
        help="default allreduce; a size is the larger buffer's (reduce_scatter's input, allgather's output), "
        "as in nccl-tests",
    )
    parser.add_argument("-b", "--min-bytes", type=_size_arg, default=8, help="smallest size (default 8; K/M/G)")
    parser.add_argument("-e", "--max-bytes", type=_size_arg, default=256 << 20, help="largest size (default 256M)")
    parser.add_argument("-f", "--factor", type=float, default=2.0, help="size multiplier between steps (default 2)")
    parser.add_argument(
        "-d",
        "--dtype",
        type=_dtype_arg,
        default="float32",
        choices=pycomm.SUPPORTED_DTYPES,
        help="default float32; nccl-tests' half, float, double also",
    )
    parser.add_argument(
        "-o", "--op", choices=[o.name.lower() for o in ReduceOp], help="allreduce and reduce_scatter: default sum"
    )
    parser.add_argument("-r", "--root", type=_nonnegative_int, help="broadcast: the root rank (default 0)")
    parser.add_argument("-n", "--iters", type=_positive_int, help="timed calls per size (default: adaptive, 5 to 1000)")
    parser.add_argument("-w", "--warmup", type=_nonnegative_int, help="untimed calls per size (default: iters/10)")
    parser.add_argument("--repeats", type=_positive_int, default=1, help="timed loops per size; the median is shown")
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="NCCL's in-place forms: allreduce into x, reduce_scatter into x's own block, allgather from "
        "out's own block",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where the buffers live: host memory (default) or each rank's GPU (cupy or torch arrays)",
    )
    parser.add_argument(
        "--gpu-library",
        choices=LIBRARIES,
        help="--device gpu: whose arrays (default: cupy, else torch; torch for bfloat16)",
    )
    parser.add_argument(
        "--shared", action="store_true", help="allocate the buffer with comm.empty (shared memory; implies --in-place)"
    )
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count elements differing from the exact result (default on)",
    )
    parser.add_argument(
        "--vs", choices=["mpi"], help="also time MPI's own collective (mpi4py) and show the ratio (its time / pycomm's)"
    )
    parser.add_argument(
        "--also",
        type=_algorithm_list,
        default=[],
        metavar="ALGO[,ALGO]",
        help="also time pycomm forced to these algorithms (e.g. ring), interleaved; vs_ALGO = its time / pycomm's",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        help="measure this node's memory bandwidth (its GPUs' with --device gpu) next to each size and show "
        "the busbw floor (default on)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of busbw against size (needs matplotlib)")
    return parser


def main(argv=None) -> int:
    """Runs the sweep; returns 0, or 1 if any element was wrong (the exit status under mpirun)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.factor <= 1:
        parser.error("--factor must be greater than 1")
    if args.device == "gpu":
        for given, name in ((args.shared, "--shared"), (args.also, "--also")):
            if given:
                parser.error(f"{name} applies to host buffers, not to --device gpu")
    elif args.gpu_library:
        parser.error("--gpu-library needs --device gpu")
    args.floor = True if args.floor is None else args.floor
    args.in_place = args.in_place or args.shared
    if args.min_bytes > args.max_bytes:
        parser.error("--min-bytes is larger than --max-bytes")
    dtype = numpy_dtype(args.dtype)
    kind = COLLECTIVES[args.collective]
    if args.op is not None and not kind.reduces:
        parser.error(f"--op applies to allreduce and reduce_scatter, not to {args.collective}")
    if args.root is not None and not kind.rooted:
        parser.error(f"--root applies to broadcast, not to {args.collective}")
    if kind.reduces:
        args.op = args.op or "sum"
    op = parse_op(args.op or "sum")  # unused where nothing is reduced
    if op == ReduceOp.AVG and not is_floating(dtype):
        parser.error(f"avg is only defined for floating-point dtypes, not {args.dtype}")
    world = MPI.COMM_WORLD
    args.root = args.root or 0
    if args.root >= world.size:
        parser.error(f"--root {args.root} is not a rank of {world.size}")
    args.in_place = args.in_place or kind.in_place_only
    tables = input_tables(op, dtype, world.size, world.rank) if kind.reduces else None
    collective = kind(world.size, world.rank, dtype, tables, args.root)
    counts = sizes_in_elements(args, dtype.itemsize, collective.count_multiple())
    if not counts:
        parser.error(
            f"no size from {args.min_bytes} to {args.max_bytes} bytes holds a whole {args.dtype} element"
            + (f" per rank ({world.size} ranks)" if collective.count_multiple() > 1 else "")
        )
    # Rank 0 writes the outputs at the end: a path it cannot write fails now, not after the sweep.
    unwritable = world.bcast(_unwritable(args.json, args.plot) if world.rank == 0 else None)
    if unwritable:
        parser.error(unwritable)

    lead = world.rank == 0
    with pycomm.Communicator() as comm:
        buffers = device_buffers(args, dtype, comm, world, parser) if args.device == "gpu" else None
        mpi_ok = args.vs == "mpi" and mpi_has_dtype(dtype)
        meta = metadata(args, argv, comm, world)
        if buffers:
            meta.update(gpu=buffers.gpu.device_name, gpu_library=buffers.gpu.library)
        if lead:
            what = f"op={op.name.lower()}" if kind.reduces else f"root={args.root}" if kind.rooted else ""
            print(
                f"# pycomm {args.collective} benchmark: P={world.size} dtype={args.dtype} {what} "
                f"in_place={'yes' if args.in_place else 'no'} shared={'yes' if args.shared else 'no'} "
                f"chunk_bytes={comm.chunk_bytes} algorithm={comm.algorithm} inter_node={comm.inter_node} "
                f"local_size={comm.local_size}\n"
                f"# BUILD_MPI: {pycomm.BUILD_MPI}\n"
                f"# {meta['hostname']}, {meta['cpu_model']}, nproc={meta['nproc']}, {meta['date']}"
            )
            if buffers:
                print(f"# device=gpu: {meta['gpu_library']} arrays on {meta['gpu']}")
                if mpi_ok:
                    print(f"# --vs mpi: each MPI call copies to the host, runs {kind.mpi_name} and copies back")
            if args.vs == "mpi" and not mpi_ok:
                print(f"# --vs mpi: this MPI has no {args.dtype} datatype, so the MPI columns are N/A")
            elif mpi_ok and kind.reduces and op == ReduceOp.AVG:
                print("# --vs mpi: MPI has no avg, so the MPI columns time MPI_SUM")
            print(format_header(args), flush=True)

        also = {name: pycomm.Communicator(algorithm=name) for name in args.also}
        node = world.Split_type(MPI.COMM_TYPE_SHARED) if args.floor else None
        try:
            rows = [run_size(count, args, collective, op, comm, world, mpi_ok, also, node, buffers) for count in counts]
        finally:
            for other in also.values():
                other.close()
            if node is not None:
                node.Free()

    total_wrong = sum((row["wrong"] or 0) + sum(o["wrong"] or 0 for o in row.get("also", {}).values()) for row in rows)
    if lead:
        summarize(rows, args, meta, total_wrong)
    return 1 if total_wrong else 0


def _unwritable(*paths):
    """Why the first of `paths` (None: not asked for) cannot be written, or None."""
    for path in paths:
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            return f"cannot write {path}: no folder {folder}"
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            return f"cannot write {path}: permission denied"
    return None


def device_buffers(args, dtype, comm, world, parser) -> DeviceBuffers:
    """This rank's GPU buffers; a usage error on every rank if any rank cannot have them (the
    others would otherwise wait for it in the first collective)."""
    error = None
    # cupy has no bfloat16: torch's arrays then, unless the user chose.
    library = args.gpu_library or ("torch" if dtype.name == "bfloat16" else None)
    try:
        gpu = GpuArrays(library, comm.local_rank)
        gpu.empty(0, dtype)  # a dtype the library lacks fails here, not in the sweep
    except Exception as e:  # any rank's failure stops every rank, none waiting for it
        error = str(e) if isinstance(e, GpuUnavailable) else f"{type(e).__name__}: {e}"
    errors = world.allgather(error)
    first = next((e for e in errors if e), None)
    if first:
        parser.error(first if error else f"rank {errors.index(first)}: {first}")
    return DeviceBuffers(gpu, dtype)


def summarize(rows: list, args, meta: dict, total_wrong: int) -> None:
    if rows:
        line = f"# Avg bus bandwidth: {statistics.mean(r['busbw'] for r in rows):.3f} GB/s"
        ratios = [r["ratio"] for r in rows if "ratio" in r]
        if ratios:
            mpi_avg = statistics.mean(r["mpi_busbw"] for r in rows if "mpi_busbw" in r)
            line += f" (MPI {mpi_avg:.3f} GB/s); geometric mean of ratio {statistics.geometric_mean(ratios):.3f}"
        print(line)
    if args.check:
        print(f"# Wrong elements: {total_wrong} {'OK' if not total_wrong else 'FAILED'}")
        mpi_wrong = sum(r.get("mpi_wrong") or 0 for r in rows)
        if mpi_wrong:
            # MPI is the reference: its errors mean this benchmark's expected values are wrong.
            mpi_name = COLLECTIVES[meta["collective"]].mpi_name
            print(f"# {mpi_name} also got {mpi_wrong} elements wrong: the expected values are suspect")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metadata": meta, "rows": rows}, f, indent=2)
            f.write("\n")
        print(f"# JSON written to {args.json}")
    if args.plot:
        write_plot(args.plot, rows, meta)
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
