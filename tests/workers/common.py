"""Shared by the worker scripts that tests/launch.py starts under mpirun."""

import hashlib
import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

import pycomm

ALL_DTYPES = pycomm.SUPPORTED_DTYPES
OPS = ("sum", "prod", "min", "max", "avg")


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def is_float(dtype: np.dtype) -> bool:
    return dtype.name in ("float16", "bfloat16", "float32", "float64")


def dtype_op_cases(names):
    """(name, dtype, op) for every dtype in `names` and every op defined for it (no avg of integers)."""
    for name in names:
        dtype = np_dtype(name)
        for op in OPS:
            if not (op == "avg" and dtype.kind in "iu"):
                yield name, dtype, op


def make_input(rank: int, n: int, dtype: np.dtype, op: str, seed: int = 0) -> np.ndarray:
    """Rank `rank`'s deterministic input, chosen so that `op` over a few ranks stays in range."""
    rng = np.random.default_rng([seed, rank, n])
    if is_float(dtype):
        if op == "prod":
            values = rng.uniform(0.5, 1.5, n)
        else:
            values = rng.standard_normal(n) * 10
    else:
        info = np.iinfo(dtype)
        # Sums and products may wrap: both sides of the comparison wrap the same way.
        values = rng.integers(max(info.min, -100), min(info.max, 100), n, endpoint=True)
    return values.astype(dtype)


def reference(inputs: list, dtype: np.dtype, op: str) -> np.ndarray:
    """The exact reduction in float64 for floats, and in the dtype's own wrapping arithmetic for integers."""
    stack = np.stack([x.astype(np.float64) if is_float(dtype) else x for x in inputs])
    if op in ("sum", "avg"):
        result = stack.sum(axis=0, dtype=None if is_float(dtype) else dtype)
        return result / len(inputs) if op == "avg" else result
    if op == "prod":
        return stack.prod(axis=0, dtype=None if is_float(dtype) else dtype)
    return stack.min(axis=0) if op == "min" else stack.max(axis=0)


# Per-step rounding of float16/bfloat16 (accumulated in float32, stored back after each step).
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def matches(result: np.ndarray, inputs: list, dtype: np.dtype, op: str) -> bool:
    expected = reference(inputs, dtype, op)
    if not is_float(dtype) or op in ("min", "max"):
        return np.array_equal(result.astype(expected.dtype), expected)
    p = len(inputs)
    # Error bound of P-1 rounded steps plus the final rounding, on the scale of the operands.
    scale = np.stack([np.abs(x.astype(np.float64)) for x in inputs]).sum(axis=0)
    if op == "prod":
        scale = np.abs(expected)
    if op == "avg":
        scale = scale / p
    tolerance = 2 * p * _EPS[dtype.name] * scale + 1e-300
    return bool(np.all(np.abs(result.astype(np.float64) - expected) <= tolerance))


def digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def same_on_all_ranks(a: np.ndarray) -> bool:
    digests = MPI.COMM_WORLD.allgather(digest(a))
    return len(set(digests)) == 1


class DLPackOnly:
    """Shows pycomm nothing of `array` (numpy, torch, ...) but its DLPack interface."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def run_mode(modes: dict) -> None:
    """Runs the worker function that sys.argv[1] names, then agrees on the outcome across ranks."""
    failures = Failures()
    modes[sys.argv[1]](failures)
    failures.finish()


class Failures:
    """Collects failed cases on this rank, then agrees on the outcome across ranks."""

    def __init__(self):
        self.items = []
        self.checked = 0

    def check(self, ok: bool, what: str) -> None:
        self.checked += 1
        if not ok:
            self.items.append(what)

    def finish(self) -> None:
        rank = MPI.COMM_WORLD.rank
        for item in self.items[:20]:
            print(f"FAIL rank {rank}: {item}")
        total = MPI.COMM_WORLD.allreduce(len(self.items))
        if rank == 0:
            print(f"{self.checked} checks per rank, {total} failures over all ranks")
        sys.exit(1 if total else 0)
