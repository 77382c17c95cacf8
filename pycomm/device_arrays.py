"""Device (CUDA) arrays: torch CUDA tensors, cupy arrays, anything with __cuda_array_interface__,
and arrays that speak only DLPack (__dlpack__ / __dlpack_device__) on a CUDA device.

Nothing here imports torch, cupy or jax: their modules are only looked up in sys.modules once the
caller has passed one of their arrays (and so has imported them already). DLPack capsules are read
with ctypes.
"""

import contextlib
import ctypes
import sys
from typing import NamedTuple

import numpy as np

from ._native import _core
from .dtypes import dtype_code, known_code


class DeviceArray(NamedTuple):
    obj: object
    ptr: int
    shape: tuple
    dtype: np.dtype
    device: int
    library: str  # "torch", "cupy", "cai" or "dlpack"
    keep: object = None  # a DLPack capsule: holds the producer's memory while this lives
    producer_stream: object = None  # __cuda_array_interface__'s "stream", if it names one
    readonly: bool = False  # as the interface says: refused only where pycomm would write


# DLDeviceType values (dlpack.h).
DLPACK_CPU, DLPACK_CUDA, DLPACK_CUDA_HOST, DLPACK_CUDA_MANAGED = 1, 2, 3, 13
DLPACK_HOST_READABLE = (DLPACK_CPU, DLPACK_CUDA_HOST)  # taken as numpy views by buffers.py
_DLPACK_ON_GPU = (DLPACK_CUDA, DLPACK_CUDA_MANAGED)


# How arrays of a type are read, found once per type: a device call costs a few microseconds of
# Python, and hasattr(x, "__cuda_array_interface__") alone builds the whole dict on each call.
_TORCH, _CUPY, _OTHER = "torch", "cupy", "other"
_kinds = {}


def _kind(x) -> str:
    """torch tensors; cupy arrays (always on a GPU); or "other", checked object by object, since
    a class may define __cuda_array_interface__ and raise for arrays in host memory (jax does)."""
    cls = type(x)
    kind = _kinds.get(cls)
    if kind is None:
        module = cls.__module__ or ""
        tensor = getattr(sys.modules.get("torch"), "Tensor", None)
        if (module.startswith("torch") and hasattr(cls, "data_ptr")) or (
            isinstance(tensor, type) and issubclass(cls, tensor)
        ):
            kind = _TORCH  # torch's own tensors and subclasses defined elsewhere
        elif module.startswith("cupy") and hasattr(cls, "__cuda_array_interface__"):
            kind = _CUPY
        else:
            kind = _OTHER
        _kinds[cls] = kind
    return kind


def _is_torch(x) -> bool:
    return _kind(x) == _TORCH


def dlpack_device_type(x):
    """x's DLDeviceType if x speaks DLPack (numpy arrays aside), else None."""
    if isinstance(x, np.ndarray) or not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    return int(x.__dlpack_device__()[0])


def is_device_array(x) -> bool:
    """True for arrays that take the device path: torch CUDA tensors, __cuda_array_interface__,
    and DLPack arrays on any device but the host-readable ones (describe() rejects the unknown)."""
    kind = _kind(x)
    if kind == _TORCH:
        return bool(x.is_cuda)
    if kind != _OTHER or hasattr(x, "__cuda_array_interface__"):
        return True
    device_type = dlpack_device_type(x)
    return device_type is not None and device_type not in DLPACK_HOST_READABLE


def is_torch_cpu(x) -> bool:
    return _is_torch(x) and not x.is_cuda


_torch_dtypes = {}  # torch dtype -> numpy dtype, for those seen before


def _torch_dtype(t) -> np.dtype:
    dtype = _torch_dtypes.get(t.dtype)
    if dtype is not None:
        return dtype
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise TypeError(f"pycomm: dtype {t.dtype} is not supported") from None
    _torch_dtypes[t.dtype] = dtype
    return dtype


def describe(x, what: str = "x", stream=None) -> DeviceArray:
    """Checks a device array (supported dtype, C-contiguous) and returns what the core needs.

    `stream` is the stream the work will be queued on, as stream_handle() takes it (None: the
    library's own); only DLPack-only arrays need it here, to hand it to their __dlpack__.
    """
    kind = _kind(x)
    if kind == _TORCH:
        if x.requires_grad:  # as for CPU tensors: writing it would bypass autograd
            raise ValueError(f"pycomm: {what} requires grad; pass {what}.detach() (or a .grad)")
        if x.is_neg() or x.is_conj():  # its memory holds other values than the tensor's
            raise ValueError(
                f"pycomm: {what} is a lazily negated or conjugated view; pass {what}.resolve_neg().resolve_conj()"
            )
        dtype = _torch_dtype(x)
        dtype_code(dtype)
        if not x.is_contiguous():
            raise ValueError(f"pycomm: {what} must be contiguous (use .contiguous())")
        return DeviceArray(x, x.data_ptr(), tuple(x.shape), dtype, x.get_device(), "torch")
    if kind == _CUPY:
        # Its own attributes, which __cuda_array_interface__ is built from on each read. cupy
        # keeps ml_dtypes' bfloat16 as its dtype (the interface says raw bytes, "|V2").
        dtype = np.dtype(x.dtype)
        dtype_code(dtype)
        if not x.flags.c_contiguous:
            raise ValueError(f"pycomm: {what} must be C-contiguous")
        return DeviceArray(x, x.data.ptr, tuple(x.shape), dtype, x.device.id, "cupy")
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is None:
        return _describe_dlpack(x, what, stream)
    dtype = np.dtype(iface["typestr"])
    dtype_code(dtype)
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    if strides is not None and not _is_c_contiguous_bytes(shape, tuple(strides), dtype.itemsize):
        raise ValueError(f"pycomm: {what} must be C-contiguous")
    ptr, readonly = iface["data"]
    # -1: the core asks the driver where ptr lives. The interface does not say, and a `.device.id`
    # need not be the CUDA device's number (jax's is global across its processes).
    return DeviceArray(x, ptr, shape, dtype, -1, "cai", None, iface.get("stream"), bool(readonly))


def plain_in_place(x):
    """For the commonest device call (in place, on the library's current stream): (library, ptr,
    count, dtype code, device, stream) of a torch CUDA tensor or cupy array of a type seen
    before that needs none of describe()'s special cases and whose dtype pycomm has accepted
    before; None for anything else (host arrays too), which describe() then checks. A small
    call's budget is ~20 us on every rank (issue 4): this skips describe()'s tuple and the
    lookups it repeats."""
    kind = _kinds.get(type(x))
    if kind == _TORCH:
        if not x.is_cuda or x.requires_grad or x.is_neg() or x.is_conj() or not x.is_contiguous():
            return None
        code = known_code(_torch_dtypes.get(x.dtype))
        if code is None:
            return None
        device = x.get_device()
        raw = _torch_raw_stream()
        if raw is None:
            return None
        return _TORCH, x.data_ptr(), x.numel(), code, device, raw(device)
    if kind == _CUPY:
        code = known_code(x.dtype)
        if code is None or not x.flags.c_contiguous:
            return None
        device = x.device.id
        return _CUPY, x.data.ptr, x.size, code, device, sys.modules["cupy"].cuda.get_current_stream(device).ptr
    return None


def _torch_raw_stream():
    """torch's current stream of a device as a raw handle, without building a Stream object
    (CUDA builds of torch have it); None elsewhere."""
    return getattr(sys.modules["torch"]._C, "_cuda_getCurrentRawStream", None)


def bump_version(library: str, obj) -> None:
    """Once a write into `obj` is queued: a torch tensor's version goes up, as with torch's own
    in-place operations, so that autograd refuses a backward that saved its old values instead
    of silently using the new ones. Not for inference tensors, which autograd never saves and
    whose version some torch builds refuse to raise outside inference mode: the write has
    happened by then, and the call must not fail for it."""
    if library == _TORCH and not obj.is_inference():
        sys.modules["torch"].autograd.graph.increment_version(obj)  # a tensor: torch < 2.5 takes no tuple


def mark_host_written(obj) -> None:
    """Once the host path has written into `obj` (a caller's output, or x in place): bump_version
    for a torch CPU tensor, nothing for other arrays."""
    if _kind(obj) == _TORCH:
        bump_version(_TORCH, obj)


def check_writable(d: DeviceArray, what: str) -> None:
    """Before anything is sent: pycomm is about to write into `d`."""
    if d.readonly:
        raise ValueError(f"pycomm: {what} is read-only")


def mark_written(d: DeviceArray) -> None:
    """Once a write into `d` is queued (bump_version)."""
    bump_version(d.library, d.obj)


def hold_for_stream(stream: int, arrays) -> None:
    """Before work on `arrays` is queued on `stream`, named by the caller (stream=): torch's
    caching allocator hands a freed tensor's memory out again in the order of the stream it was
    allocated on, so a tensor the caller drops at once could be reused while `stream` still
    reads or writes it. As torch.distributed does, each tensor is recorded as in use on `stream`
    (Tensor.record_stream: nothing where that is its own stream). cupy's pool has no such record:
    its arrays stay the caller's to keep, as with NCCL."""
    for a in arrays:
        if a.library == "torch":
            a.obj.record_stream(_torch_stream(stream, a.obj.device))


_torch_streams: dict = {}  # (handle, device) -> torch's stream object for it


def _torch_stream(handle: int, device):
    """torch's stream object for a raw handle: its default stream for 0, 1 and 2. The legacy
    default stream (0, 1) is torch's own; an event on it waits for every thread's per-thread
    default stream (2), which torch would otherwise take as the stream of whichever thread
    frees the tensor."""
    key = (handle, device)
    stream = _torch_streams.get(key)
    if stream is None:
        torch = sys.modules["torch"]
        if handle in (0, 1, 2):
            stream = torch.cuda.default_stream(device)
        else:
            stream = torch.cuda.ExternalStream(handle, device)
        if len(_torch_streams) >= 64:  # handles of streams long destroyed
            _torch_streams.clear()
        _torch_streams[key] = stream
    return stream


# DLPack's DLManagedTensor starts with its DLTensor; only that part is read.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # in elements; NULL: C-contiguous
        ("byte_offset", ctypes.c_uint64),
    ]


# A prototype of our own, so that no other user of ctypes.pythonapi sees its argtypes changed.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)

# (DLDataTypeCode, bits) -> numpy dtype name; kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6.
_DLPACK_DTYPES = {
    (0, 8): "int8",
    (0, 16): "int16",
    (0, 32): "int32",
    (0, 64): "int64",
    (1, 8): "uint8",
    (1, 16): "uint16",
    (1, 32): "uint32",
    (1, 64): "uint64",
    (2, 16): "float16",
    (2, 32): "float32",
    (2, 64): "float64",
    (4, 16): "bfloat16",
    (6, 8): "bool",
}


def _dlpack_dtype(code: int, bits: int, lanes: int, what: str) -> np.dtype:
    name = _DLPACK_DTYPES.get((code, bits))
    if name is None or lanes != 1:
        raise TypeError(f"pycomm: {what} has DLPack dtype (code {code}, {bits} bits, {lanes} lanes): not supported")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _describe_dlpack(x, what: str, stream) -> DeviceArray:
    """A CUDA array that speaks only DLPack: exported with __dlpack__(stream=...) for the stream
    the work goes on (so the producer orders its pending work before it), read from the legacy
    "dltensor" capsule. The capsule is kept, not consumed: its destructor frees it."""
    device_type, device_id = (int(v) for v in x.__dlpack_device__())
    if device_type not in _DLPACK_ON_GPU:
        raise TypeError(
            f"pycomm: {what} is a DLPack array on device type {device_type}; pycomm takes CPU (1), "
            f"CUDA (2), CUDA host (3) and CUDA managed (13) memory"
        )
    handle = 0 if stream is None else _stream_value(stream)
    # DLPack: stream 0 is ambiguous and never passed; 1 names the legacy default stream. So does
    # 2 here, the per-thread default stream (torch refuses 2): that is a blocking stream, so work
    # queued on it waits for what the producer makes the legacy stream wait for. The producer
    # orders its work on the current device's stream of that handle (torch refuses an array on
    # another), so the array's GPU is made current for the export.
    with _device_scope(device_id):
        capsule = x.__dlpack__(stream=handle if handle not in (0, 2) else 1)
    try:
        address = _capsule_pointer(capsule, b"dltensor")
    except ValueError:
        raise TypeError(f'pycomm: {what}.__dlpack__() did not return a legacy "dltensor" capsule') from None
    t = _DLTensor.from_address(address)
    dtype = _dlpack_dtype(t.dtype.code, t.dtype.bits, t.dtype.lanes, what)
    dtype_code(dtype)
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    if t.strides:
        strides = tuple(int(t.strides[i]) for i in range(t.ndim))
        if not _is_c_contiguous(shape, strides):
            raise ValueError(f"pycomm: {what} must be C-contiguous")
    ptr = (t.data or 0) + t.byte_offset
    return DeviceArray(x, ptr, shape, dtype, device_id, "dlpack", capsule)


def _device_scope(device: int):
    """`with` it: `device` is the current GPU (the thread's context comes back afterwards)."""
    return _core.DeviceScope(device)


def _is_c_contiguous(shape: tuple, strides: tuple) -> bool:
    """Strides in elements; those of extent-1 axes, and any of an empty array, do not matter."""
    if 0 in shape:
        return True
    step = 1
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != step:
            return False
        step *= extent
    return True


def _is_c_contiguous_bytes(shape: tuple, strides: tuple, itemsize: int) -> bool:
    """The same for strides in bytes (__cuda_array_interface__'s)."""
    in_elements = tuple(s // itemsize if s % itemsize == 0 else None for s in strides)
    return _is_c_contiguous(shape, in_elements)


def check_output(out, like: DeviceArray, shape: tuple, what: str = "out", stream=None) -> DeviceArray:
    """Checks `out` against x (`like`), their GPUs aside (Communicator._device_output); `stream` as
    for describe()."""
    if not is_device_array(out):
        raise TypeError(f"pycomm: {what} must be a device array like x, got {type(out).__name__}")
    d = describe(out, what, stream)
    check_writable(d, what)
    if d.dtype != like.dtype:
        raise TypeError(f"pycomm: {what} has dtype {d.dtype}, expected {like.dtype}")
    if d.shape != tuple(shape):
        raise ValueError(f"pycomm: {what} has shape {d.shape}, expected {tuple(shape)}")
    return d


def new_array(like: DeviceArray, shape: tuple, stream: int) -> DeviceArray:
    """A new array of x's library, dtype and device (not for "cai" or "dlpack": pass out=),
    allocated for `stream`, the one the work goes on: torch's and cupy's allocators reuse freed
    memory in the order of the stream it was allocated for, so an output allocated for another
    and dropped at once could be handed out again while the work still writes it."""
    # Stream handles 1 and 2 (legacy and per-thread default) have no stream object to allocate
    # for: the current stream serves there.
    if like.library == "torch":
        torch = sys.modules["torch"]
        device = like.obj.device
        with contextlib.ExitStack() as context:
            if stream not in (1, 2) and stream != stream_handle(like, None):
                on = torch.cuda.default_stream(device) if stream == 0 else torch.cuda.ExternalStream(stream, device)
                context.enter_context(torch.cuda.stream(on))
            out = torch.empty(shape, dtype=like.obj.dtype, device=device)
    elif like.library == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(like.device), contextlib.ExitStack() as context:
            if stream not in (1, 2) and stream != stream_handle(like, None):
                context.enter_context(_cupy_stream(cupy, stream, like.device))
            out = cupy.empty(shape, dtype=like.dtype)
    else:
        raise TypeError(f"pycomm: cannot allocate an output like {type(like.obj).__name__}; pass out=")
    return describe(out, "out")


class _StreamHandle:
    """A raw cudaStream_t through the CUDA stream protocol."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _cupy_stream(cupy, handle: int, device: int):
    """cupy's stream object for a raw handle, on `device` (current): Stream.from_external from
    cupy 14, which deprecates ExternalStream (still taken before)."""
    from_external = getattr(getattr(cupy.cuda, "Stream", None), "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(handle, device)
    return from_external(_StreamHandle(handle))


def stream_handle(like: DeviceArray, stream) -> int:
    """The cudaStream_t to enqueue on: `stream` if given, else the library's current stream
    (0, the legacy default stream, for DLPack-only arrays)."""
    if stream is not None:
        return _stream_value(stream)
    if like.library == "torch":
        torch = sys.modules["torch"]
        raw = _torch_raw_stream()
        if raw is not None:
            return raw(like.device)
        return torch.cuda.current_stream(like.obj.device).cuda_stream
    if like.library == "cupy":
        # cupy keeps a current stream per device (since v10): the array's, not the current device's.
        return sys.modules["cupy"].cuda.get_current_stream(like.device).ptr
    value = like.producer_stream
    return value if isinstance(value, int) else 0


def _stream_value(stream) -> int:
    value = None
    if isinstance(stream, int) and not isinstance(stream, bool):
        value = stream
    elif hasattr(stream, "__cuda_stream__"):  # the CUDA stream protocol: (version, address)
        value = stream.__cuda_stream__()[1]
    else:
        for attribute in ("cuda_stream", "ptr", "handle"):  # torch, cupy, cuda-python / numba
            value = getattr(stream, attribute, None)
            if isinstance(value, ctypes.c_void_p):  # numba's handle
                value = value.value or 0
            if isinstance(value, int):
                break
    if not isinstance(value, int):
        raise TypeError(f"pycomm: cannot read a CUDA stream from {type(stream).__name__}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"pycomm: {value} is not a CUDA stream handle")
    return value
