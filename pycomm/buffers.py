"""Checks and adapts the arrays users pass, before anything is sent.

Every check here runs on the calling rank only, so bad input raises TypeError or ValueError
there and leaves the communicator usable.
"""

import numpy as np

from .dtypes import dtype_code


def as_input(x, what: str = "x") -> np.ndarray:
    """Returns `x` as a C-contiguous numpy array without copying; rejects anything else."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"pycomm: {what} must be a numpy array, got {type(x).__name__}")
    dtype_code(x.dtype)
    if not x.flags.c_contiguous:
        raise ValueError(f"pycomm: {what} must be C-contiguous (use np.ascontiguousarray)")
    return x


def as_output(out, shape: tuple, dtype: np.dtype, what: str = "out") -> np.ndarray:
    """Checks a caller-provided output array against the shape and dtype the call produces."""
    out = as_input(out, what)
    if out.dtype != dtype:
        raise TypeError(f"pycomm: {what} has dtype {out.dtype}, expected {dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"pycomm: {what} has shape {out.shape}, expected {tuple(shape)}")
    if not out.flags.writeable:
        raise ValueError(f"pycomm: {what} is read-only")
    return out


def address(a: np.ndarray) -> int:
    return a.ctypes.data


def check_no_partial_overlap(x: np.ndarray, out: np.ndarray) -> None:
    """In place (out is x's memory exactly) is fine; any other overlap would corrupt the result."""
    if out is x or not np.may_share_memory(x, out):
        return
    if address(x) != address(out) or x.nbytes != out.nbytes:
        raise ValueError("pycomm: out overlaps x without being the same memory")
