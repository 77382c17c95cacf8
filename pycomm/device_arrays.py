"""Device (CUDA) arrays: torch CUDA tensors, cupy arrays, anything with __cuda_array_interface__.

Nothing here imports torch or cupy: their modules are only looked up in sys.modules once the
caller has passed one of their arrays (and so has imported them already).
"""

import sys
from typing import NamedTuple

import numpy as np

from .dtypes import dtype_code


class DeviceArray(NamedTuple):
    obj: object
    ptr: int
    shape: tuple
    dtype: np.dtype
    device: int
    library: str  # "torch", "cupy" or "cai"


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def is_device_array(x) -> bool:
    if _is_torch(x):
        return bool(x.is_cuda)
    return hasattr(x, "__cuda_array_interface__")


def is_torch_cpu(x) -> bool:
    return _is_torch(x) and not x.is_cuda


def _torch_dtype(t) -> np.dtype:
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise TypeError(f"pycomm: dtype {t.dtype} is not supported") from None


def describe(x, what: str = "x") -> DeviceArray:
    """Checks a device array (supported dtype, C-contiguous) and returns what the core needs."""
    if _is_torch(x):
        dtype = _torch_dtype(x)
        dtype_code(dtype)
        if not x.is_contiguous():
            raise ValueError(f"pycomm: {what} must be contiguous (use .contiguous())")
        return DeviceArray(x, x.data_ptr(), tuple(x.shape), dtype, x.device.index, "torch")
    iface = x.__cuda_array_interface__
    library = "cupy" if type(x).__module__.startswith("cupy") else "cai"
    # cupy keeps ml_dtypes' bfloat16 as its dtype but reports it as raw bytes ("|V2") here.
    dtype = np.dtype(x.dtype) if library == "cupy" else np.dtype(iface["typestr"])
    dtype_code(dtype)
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
        raise ValueError(f"pycomm: {what} must be C-contiguous")
    ptr, readonly = iface["data"]
    if readonly:
        raise ValueError(f"pycomm: {what} is read-only")
    device = getattr(getattr(x, "device", None), "id", 0)
    return DeviceArray(x, ptr, shape, dtype, device, library)


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def check_output(out, like: DeviceArray, shape: tuple, what: str = "out") -> DeviceArray:
    if not is_device_array(out):
        raise TypeError(f"pycomm: {what} must be a device array like x, got {type(out).__name__}")
    d = describe(out, what)
    if d.dtype != like.dtype:
        raise TypeError(f"pycomm: {what} has dtype {d.dtype}, expected {like.dtype}")
    if d.shape != tuple(shape):
        raise ValueError(f"pycomm: {what} has shape {d.shape}, expected {tuple(shape)}")
    if d.device != like.device:
        raise ValueError(f"pycomm: {what} is on GPU {d.device}, x on GPU {like.device}")
    return d


def new_array(like: DeviceArray, shape: tuple) -> DeviceArray:
    """A new array of x's library, dtype and device."""
    if like.library == "torch":
        torch = sys.modules["torch"]
        out = torch.empty(shape, dtype=like.obj.dtype, device=like.obj.device)
    elif like.library == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(like.device):
            out = cupy.empty(shape, dtype=like.dtype)
    else:
        raise TypeError(f"pycomm: cannot allocate an output like {type(like.obj).__name__}; pass out=")
    return describe(out, "out")


def stream_handle(like: DeviceArray, stream) -> int:
    """The cudaStream_t to enqueue on: `stream` if given, else the library's current stream."""
    if stream is not None:
        if isinstance(stream, int):
            return stream
        for attribute in ("cuda_stream", "ptr", "handle"):  # torch, cupy, cuda-python
            value = getattr(stream, attribute, None)
            if isinstance(value, int):
                return value
        raise TypeError(f"pycomm: cannot read a CUDA stream from {type(stream).__name__}")
    if like.library == "torch":
        return sys.modules["torch"].cuda.current_stream(like.obj.device).cuda_stream
    if like.library == "cupy":
        return sys.modules["cupy"].cuda.get_current_stream().ptr
    value = like.obj.__cuda_array_interface__.get("stream")
    return value if isinstance(value, int) else 0
