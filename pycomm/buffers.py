"""Checks and adapts the host arrays users pass, before anything is sent.

numpy arrays pass as they are; torch CPU tensors and other arrays that speak DLPack from host
memory (CPU, or CUDA pinned host memory) pass as numpy views of the same memory (no copies).
Every check here runs on the calling rank only, so bad input raises TypeError or ValueError there
and leaves the communicator usable.
"""

import sys

import numpy as np

from .device_arrays import DLPACK_HOST_READABLE, dlpack_device_type, is_torch_cpu
from .dtypes import dtype_code


def as_input(x, what: str = "x") -> np.ndarray:
    """Returns `x` as a C-contiguous numpy array without copying; rejects anything else."""
    view = x if isinstance(x, np.ndarray) else _numpy_view(x, what)
    dtype_code(view.dtype)
    if not view.flags.c_contiguous:
        fix = ".contiguous()" if is_torch_cpu(x) else "np.ascontiguousarray"
        raise ValueError(f"pycomm: {what} must be C-contiguous (use {fix})")
    return view


def as_output(out, shape: tuple, dtype: np.dtype, what: str = "out") -> np.ndarray:
    """Checks a caller-provided output array against the shape and dtype the call produces."""
    view = as_input(out, what)
    if view.dtype != dtype:
        raise TypeError(f"pycomm: {what} has dtype {view.dtype}, expected {dtype}")
    if view.shape != tuple(shape):
        raise ValueError(f"pycomm: {what} has shape {view.shape}, expected {tuple(shape)}")
    if not view.flags.writeable:
        raise ValueError(f"pycomm: {what} is read-only{read_only_hint(out)}")
    return view


def read_only_hint(x) -> str:
    """Why the numpy view of a DLPack array may be read-only, for error messages ("" for others)."""
    if isinstance(x, np.ndarray) or is_torch_cpu(x) or dlpack_device_type(x) is None:
        return ""
    return (
        " (it came through DLPack read-only: its producer flags it so, or its __dlpack__ takes no"
        " max_version and numpy marks what a legacy, unversioned export gives as read-only)"
    )


def plain_tensor_view(x):
    """The numpy view of a torch CPU tensor that needs none of as_input's special cases (the
    in-place fast path's); None for anything else, which as_input then checks and words. torch
    itself refuses the unusual ones (requires grad, lazily negated, bfloat16) in numpy()."""
    if not is_torch_cpu(x):
        return None
    try:
        return x.numpy()
    except (TypeError, RuntimeError):
        return None


def output_for(x, view: np.ndarray, out, shape: tuple):
    """The call's result and its numpy view: `out` if given (checked), else a new array of x's
    kind (a torch tensor stays a torch tensor). `view` is x's numpy view."""
    if out is not None:
        return out, as_output(out, shape, view.dtype)
    if type(x) is np.ndarray:
        result = np.empty(shape, view.dtype)
        return result, result
    if is_torch_cpu(x):
        result = sys.modules["torch"].empty(shape, dtype=x.dtype)
        return result, _numpy_view(result, "out")
    result = np.empty(shape, view.dtype)
    return result, result


def _numpy_view(x, what: str) -> np.ndarray:
    if is_torch_cpu(x):
        if x.requires_grad:
            raise ValueError(f"pycomm: {what} requires grad; pass {what}.detach() (or a .grad)")
        if x.is_neg() or x.is_conj():  # as for CUDA tensors (device_arrays.describe)
            raise ValueError(
                f"pycomm: {what} is a lazily negated or conjugated view; pass {what}.resolve_neg().resolve_conj()"
            )
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: view the bits as ml_dtypes'
            import ml_dtypes

            return x.view(sys.modules["torch"].int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    device_type = dlpack_device_type(x)
    if device_type in DLPACK_HOST_READABLE:
        return np.from_dlpack(x)
    if device_type is not None:
        raise TypeError(f"pycomm: {what} is a DLPack array on device type {device_type}, not in host memory")
    raise TypeError(f"pycomm: {what} must be a numpy array, a CPU tensor or a device array, got {type(x).__name__}")


def address(a: np.ndarray) -> int:
    return a.ctypes.data


def check_no_partial_overlap(x: np.ndarray, out: np.ndarray, x_in_out_at=None, out_in_x_at=None) -> None:
    """x and out may overlap only in place (check_in_place); any other overlap would corrupt the
    result. Their shapes and dtypes are already checked."""
    if out is x or not np.may_share_memory(x, out):
        return
    check_in_place(address(x), address(out), x_in_out_at, out_in_x_at)


def check_in_place(x_ptr: int, out_ptr: int, x_in_out_at=None, out_in_x_at=None) -> None:
    """x and out overlap: only as the same memory, x at `x_in_out_at` bytes into out (allgather:
    x is this rank's block of out), or out at `out_in_x_at` bytes into x (reduce_scatter: out is
    this rank's block of x), NCCL's in-place forms. Elsewhere one rank's writes could land where
    another rank has yet to read."""
    if x_in_out_at is not None:
        if x_ptr != out_ptr + x_in_out_at:
            raise ValueError(
                "pycomm: x overlaps out other than as this rank's block of it "
                "(in place: x = out[rank * n:(rank + 1) * n])"
            )
    elif out_in_x_at is not None:
        if out_ptr != x_ptr + out_in_x_at:
            raise ValueError(
                "pycomm: out overlaps x other than as this rank's block of it "
                "(in place: out = x[rank * n:(rank + 1) * n])"
            )
    elif x_ptr != out_ptr:
        raise ValueError("pycomm: out overlaps x without being the same memory")
