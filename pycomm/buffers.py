"""Checks and adapts the host arrays users pass, before anything is sent.

numpy arrays pass as they are; torch CPU tensors and other CPU arrays that speak DLPack pass as
numpy views of the same memory (no copies). Every check here runs on the calling rank only, so
bad input raises TypeError or ValueError there and leaves the communicator usable.
"""

import sys

import numpy as np

from .device_arrays import is_torch_cpu
from .dtypes import dtype_code

_DLPACK_CPU = 1  # DLDeviceType kDLCPU


def as_input(x, what: str = "x") -> np.ndarray:
    """Returns `x` as a C-contiguous numpy array without copying; rejects anything else."""
    if not isinstance(x, np.ndarray):
        x = _numpy_view(x, what)
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
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: view the bits as ml_dtypes'
            import ml_dtypes

            return x.view(sys.modules["torch"].int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    device = getattr(x, "__dlpack_device__", None)
    if device is not None and int(device()[0]) == _DLPACK_CPU:
        return np.from_dlpack(x)
    raise TypeError(f"pycomm: {what} must be a numpy array, a CPU tensor or a device array, got {type(x).__name__}")


def address(a: np.ndarray) -> int:
    return a.ctypes.data


def check_no_partial_overlap(x: np.ndarray, out: np.ndarray) -> None:
    """In place (out is x's memory exactly) is fine; any other overlap would corrupt the result."""
    if out is x or not np.may_share_memory(x, out):
        return
    if address(x) != address(out) or x.nbytes != out.nbytes:
        raise ValueError("pycomm: out overlaps x without being the same memory")
