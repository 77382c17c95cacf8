"""Device-array handling that needs no GPU: reading __cuda_array_interface__ and DLPack capsules,
argument checks that must fail on the calling rank before any CUDA call or message, stream
handles, and DLPack-only arrays in host memory (which take the numpy path)."""

import ctypes
import sys
from contextlib import contextmanager, nullcontext
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from gpu_marks import gpu_present

import pycomm
from pycomm import device_arrays
from pycomm.dtypes import dtype_code


class FakeDeviceArray:
    """Looks like a GPU array to pycomm (the interface only); its memory is never touched."""

    def __init__(self, shape, typestr="<f4", strides=None, readonly=False, ptr=0x7F0000000000, stream=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (ptr, readonly),
            "strides": strides,
            "version": 3,
        }
        if stream is not None:
            self.__cuda_array_interface__["stream"] = stream


@pytest.fixture
def comm():
    with pycomm.Communicator() as c:
        yield c


def test_describe_reads_the_interface():
    d = device_arrays.describe(FakeDeviceArray((3, 4), "<f2", ptr=4096))
    assert (d.ptr, d.shape, d.dtype, d.device, d.library) == (4096, (3, 4), np.dtype(np.float16), -1, "cai")
    assert device_arrays.is_device_array(d.obj) and not device_arrays.is_device_array(np.ones(3))
    # A .device.id is not taken as the CUDA device's number (jax's counts across its processes).
    global_id = FakeDeviceArray((3,))
    global_id.device = SimpleNamespace(id=5)
    assert device_arrays.describe(global_id).device == -1


def test_c_contiguous_strides_are_accepted():
    assert device_arrays.describe(FakeDeviceArray((3, 4), strides=(16, 4))).shape == (3, 4)
    # Strides of extent-1 axes do not matter (producers give them any value), nor an empty array's.
    assert device_arrays.describe(FakeDeviceArray((3, 1, 4), strides=(16, 999, 4))).shape == (3, 1, 4)
    assert device_arrays.describe(FakeDeviceArray((0, 4), strides=(8, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match="contiguous"):
        device_arrays.describe(FakeDeviceArray((4,), strides=(6,)))  # not a whole element apart


@pytest.mark.parametrize(
    "array,error,match",
    [
        (FakeDeviceArray((3, 4), strides=(4, 12)), ValueError, "contiguous"),
        (FakeDeviceArray((3,), "<c8"), TypeError, "not supported"),
        (FakeDeviceArray((3,), "|b1"), TypeError, "not supported"),
    ],
)
def test_bad_device_arrays_raise_before_anything_is_sent(comm, array, error, match):
    with pytest.raises(error, match=match):
        comm.allreduce(array)
    assert np.array_equal(comm.allreduce(np.ones(2)), np.ones(2))  # still usable


def test_outputs_on_another_gpu_are_refused_where_an_array_does_not_say_its_gpu(recorded):
    x = FakeDeviceArray((3,))  # no .device: asked of the driver (the recorder's device_of)
    with pytest.raises(ValueError, match="out is on GPU 1, x on GPU 0"):
        recorded.allreduce(x, out=FakeDeviceArray((3,), ptr=NativeRecorder.GPU1_FROM))
    with pytest.raises(ValueError, match="out is on GPU 0, x on GPU 1"):
        recorded.allreduce(CupyLikeArray((3,), device=1), out=FakeDeviceArray((3,), ptr=4096), stream=1)
    with pytest.raises(ValueError, match="out is on GPU 2, x on GPU 0"):  # both say theirs
        recorded.allreduce(CupyLikeArray((3,), device=0), out=CupyLikeArray((3,), ptr=4096, device=2), stream=1)
    assert recorded._native.calls == []
    recorded.allreduce(CupyLikeArray((3,), device=0), out=FakeDeviceArray((3,), ptr=4096), stream=1)
    assert len(recorded._native.calls) == 1


def test_read_only_device_arrays_are_refused_only_where_written(recorded):
    frozen = FakeDeviceArray((3,), readonly=True)
    recorded.allreduce(frozen, out=FakeDeviceArray((3,), ptr=4096))  # only read: fine
    recorded.allgather(frozen, out=FakeDeviceArray((3 * recorded.size,), ptr=4096))
    assert [name for name, _ in recorded._native.calls] == ["allreduce_device", "allgather_device"]
    for call in (
        lambda: recorded.allreduce(frozen, out=frozen),
        lambda: recorded.broadcast(frozen),
        lambda: recorded.allreduce(FakeDeviceArray((3,)), out=FakeDeviceArray((3,), readonly=True, ptr=4096)),
    ):
        with pytest.raises(ValueError, match="read-only"):
            call()
    assert len(recorded._native.calls) == 2


@pytest.mark.parametrize(
    "out,error,match",
    [
        (np.zeros(3, np.float32), TypeError, "device array"),
        (FakeDeviceArray((4,)), ValueError, "shape"),
        (FakeDeviceArray((3,), "<f8"), TypeError, "dtype"),
        (FakeDeviceArray((3,), ptr=0x7F0000000004), ValueError, "overlaps"),
    ],
)
def test_bad_device_outputs_raise_before_anything_is_sent(comm, out, error, match):
    with pytest.raises(error, match=match):
        comm.allreduce(FakeDeviceArray((3,)), out=out)


def test_other_device_collectives_check_arguments(comm):
    with pytest.raises(ValueError, match="divisible"):
        comm.reduce_scatter(FakeDeviceArray(()))
    with pytest.raises(ValueError, match="integer"):
        comm.allreduce(FakeDeviceArray((3,), "<i4"), op="avg")
    with pytest.raises(ValueError, match="root"):
        comm.broadcast(FakeDeviceArray((3,)), root=5)
    with pytest.raises(ValueError, match="stream"):
        comm.allreduce(np.ones(3), stream=1)


class TorchLikeStream:
    cuda_stream = 77


class CupyLikeStream:
    ptr = 88


def test_stream_handles():
    d = device_arrays.describe(FakeDeviceArray((3,), stream=2))
    assert device_arrays.stream_handle(d, None) == 2  # the producer's stream from the interface
    assert device_arrays.stream_handle(d, 5) == 5
    assert device_arrays.stream_handle(d, TorchLikeStream()) == 77
    assert device_arrays.stream_handle(d, CupyLikeStream()) == 88
    with pytest.raises(TypeError, match="stream"):
        device_arrays.stream_handle(d, "default")
    # The CUDA stream protocol, and numba's ctypes handle.
    assert device_arrays.stream_handle(d, SimpleNamespace(__cuda_stream__=lambda: (0, 66))) == 66
    assert device_arrays.stream_handle(d, SimpleNamespace(handle=ctypes.c_void_p(55))) == 55
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="not a CUDA stream handle"):
            device_arrays.stream_handle(d, bad)
    with pytest.raises(TypeError, match="stream"):
        device_arrays.stream_handle(d, True)


class CupyLikeArray:
    """cupy.ndarray's attributes as pycomm reads them; reading its interface dict fails the test."""

    def __init__(self, shape, dtype="float32", ptr=0x7F0000001000, device=1, c_contiguous=True):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape))
        self.data = SimpleNamespace(ptr=ptr)
        self.flags = SimpleNamespace(c_contiguous=c_contiguous)
        self.device = SimpleNamespace(id=device)

    @property
    def __cuda_array_interface__(self):
        raise AssertionError("cupy arrays are read from their attributes")


CupyLikeArray.__module__ = "cupy"


def test_cupy_arrays_are_read_from_their_attributes(recorded, monkeypatch):
    x = CupyLikeArray((2, 3), "int32")
    assert device_arrays.is_device_array(x)
    d = device_arrays.describe(x)
    assert (d.ptr, d.shape, d.dtype, d.device, d.library) == (0x7F0000001000, (2, 3), np.dtype(np.int32), 1, "cupy")
    assert recorded.allreduce(x, op="max", out=x, stream=9) is x
    args = (0x7F0000001000, 0x7F0000001000, 6, dtype_code(np.dtype(np.int32)), int(pycomm.ReduceOp.MAX), 1, 9)
    assert recorded._native.calls == [("allreduce_device", args)]
    # Without stream=: the current stream of the array's device (cupy keeps one per device).
    streams = SimpleNamespace(get_current_stream=lambda device_id=-1: SimpleNamespace(ptr=100 + device_id))
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=streams))
    assert device_arrays.stream_handle(d, None) == 101
    with pytest.raises(ValueError, match="C-contiguous"):
        recorded.allreduce(CupyLikeArray((4,), c_contiguous=False), stream=9)
    with pytest.raises(TypeError, match="not supported"):
        recorded.allreduce(CupyLikeArray((4,), "complex64"), stream=9)
    assert len(recorded._native.calls) == 1


def test_in_place_calls_on_the_current_stream_skip_describe_and_pass_the_same_arguments(recorded, monkeypatch):
    """The fast path (in place, no stream=, a known op) makes the native call that the full
    checks make, and leaves every unusual array or op to them (and to their errors)."""
    streams = SimpleNamespace(get_current_stream=lambda device_id=-1: SimpleNamespace(ptr=100 + device_id))
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=streams))
    described = []
    describe = device_arrays.describe
    monkeypatch.setattr(device_arrays, "describe", lambda x, *a, **k: described.append(x) or describe(x, *a, **k))
    calls = recorded._native.calls
    x = CupyLikeArray((2, 3), "int32", device=1)
    recorded.allreduce(x, op="max", out=x, stream=101)  # the full path: the array's current stream named
    recorded.allreduce(x, op="max", out=x)
    recorded.allreduce(x, op=pycomm.ReduceOp.MAX, out=x)
    assert calls[0] == calls[1] == calls[2] and calls[0][1][-1] == 101
    assert described == [x]
    recorded.allreduce(x, op="MAX", out=x)  # another spelling: the full path
    assert calls[3] == calls[0] and described == [x, x]
    for bad, error, match in [
        ((CupyLikeArray((4,), c_contiguous=False), "sum"), ValueError, "C-contiguous"),
        ((CupyLikeArray((4,), "complex64"), "sum"), TypeError, "not supported"),
        ((x, "avg"), ValueError, "integer"),
        ((x, "mean"), ValueError, "unknown op"),
    ]:
        with pytest.raises(error, match=match):
            recorded.allreduce(bad[0], op=bad[1], out=bad[0])
    assert len(calls) == 4
    recorded.close()
    with pytest.raises(pycomm.CommError, match="closed"):
        recorded.allreduce(x, op="max", out=x)
    assert len(calls) == 4


def test_torch_in_place_fast_path(recorded, monkeypatch):
    """CPU tensors of a subclass that says it is on a GPU stand in for CUDA tensors, with a
    stand-in for torch's raw current stream; plain CPU tensors take the numpy path."""
    torch = pytest.importorskip("torch")

    class OnGpu(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl

        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 40 + device, raising=False)
    monkeypatch.setattr(device_arrays, "hold_for_stream", lambda stream, arrays: None)  # CPU tensors
    described = []
    describe = device_arrays.describe
    monkeypatch.setattr(device_arrays, "describe", lambda x, *a, **k: described.append(x) or describe(x, *a, **k))
    calls = recorded._native.calls
    x = torch.ones(6, dtype=torch.float64).as_subclass(OnGpu)
    recorded.allreduce(x, op="avg", out=x, stream=39)  # CPU tensors are on device -1
    before = x._version
    assert recorded.allreduce(x, op="avg", out=x) is x
    assert recorded.allreduce_async(x, op="avg", out=x).wait() is x
    assert x._version == before + 2 and calls[2] == calls[1] == calls[0] and described == [x]
    for bad, match in [
        (torch.ones(3, requires_grad=True), "requires grad"),
        (torch._neg_view(torch.ones(3)), "negated"),
        (torch.ones(3, 2).t(), "contiguous"),
        (torch.zeros(3, dtype=torch.complex64), "not supported"),
        (torch.ones(3, dtype=torch.int32), "integer"),
    ]:
        bad = bad.as_subclass(OnGpu)
        with pytest.raises((ValueError, TypeError), match=match):
            recorded.allreduce(bad, op="avg", out=bad)
    assert len(calls) == 3
    on_host = torch.ones(3)
    assert recorded.allreduce(on_host, out=on_host) is on_host and len(calls) == 3


def test_torch_tensors_are_described_from_their_attributes():
    """On CPU tensors (describe does not ask where a tensor lives; is_device_array does)."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    for _ in range(2):  # the second time through the dtype cache
        t = torch.zeros(4, 2, dtype=torch.bfloat16)
        d = device_arrays.describe(t)
        assert (d.ptr, d.shape, d.dtype, d.device, d.library) == (t.data_ptr(), (4, 2), ml_dtypes.bfloat16, -1, "torch")
        assert device_arrays.describe(torch.zeros(3, dtype=torch.int64)).dtype == np.int64
        assert not device_arrays.is_device_array(t)
        with pytest.raises(TypeError, match="not supported"):
            device_arrays.describe(torch.zeros(3, dtype=torch.complex64))
        with pytest.raises(ValueError, match="contiguous"):
            device_arrays.describe(t.t())
        with pytest.raises(ValueError, match="requires grad"):
            device_arrays.describe(torch.zeros(3, requires_grad=True))
        # Lazily negated views: their memory holds the values before negation.
        with pytest.raises(ValueError, match="negated"):
            device_arrays.describe(torch._neg_view(torch.ones(3)))
        with pytest.raises(ValueError, match="negated"):
            device_arrays.describe(torch.tensor([1 + 2j]).conj().imag)
    # A subclass defined outside torch is still read as a torch tensor (its current stream too).
    Sub = type("Sub", (torch.Tensor,), {"__module__": "mylib"})
    assert device_arrays.describe(torch.zeros(3).as_subclass(Sub)).library == "torch"


def test_torch_outputs_written_on_the_device_count_as_modified(recorded, monkeypatch):
    """Every device collective that queues a write into a torch tensor raises its version, as
    torch's in-place operations do, so autograd refuses a backward that saved the old values.
    (CPU tensors stand in for CUDA ones here: the recorder queues nothing.)"""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(device_arrays, "is_device_array", lambda x: True)
    held = []  # with stream=: the stream, the data of the tensors held for it, and the calls made before
    monkeypatch.setattr(
        device_arrays,
        "hold_for_stream",
        lambda stream, arrays: held.append((stream, [a.ptr for a in arrays], len(recorded._native.calls))),
    )
    P = recorded.size
    x, out = torch.ones(2 * P), torch.ones(2 * P)
    calls = [
        lambda: recorded.allreduce(x, out=x, stream=5),
        lambda: recorded.allreduce(x, out=out, stream=5),
        lambda: recorded.reduce_scatter(x, out=out[:2], stream=5),
        lambda: recorded.allgather(x[:2], out=out, stream=5),
        lambda: recorded.broadcast(x, root=0, stream=5),
    ]
    written = [x, out, out, out, x]
    for call, tensor in zip(calls, written):
        before = tensor._version
        call()
        assert tensor._version == before + 1
    assert len(recorded._native.calls) == len(calls)
    # Held before each call's work is queued (a call may fail after queuing part of it).
    x_at, out_at = x.data_ptr(), out.data_ptr()
    both = [x_at, out_at]
    assert held == [(5, [x_at], 0), (5, both, 1), (5, both, 2), (5, both, 3), (5, [x_at], 4)]
    # On the current stream (no stream=) nothing needs holding.
    monkeypatch.setattr(device_arrays, "stream_handle", lambda like, stream: 5 if stream is None else stream)
    recorded.allreduce(x, out=out)
    assert len(held) == len(calls) and len(recorded._native.calls) == len(calls) + 1


def test_torch_tensors_are_recorded_on_a_stream_the_caller_names(monkeypatch):
    """torch's caching allocator would hand a dropped tensor's memory out again in the order of
    the stream it was allocated on: with stream=, the tensor is recorded as in use on that one
    (as torch.distributed does), with torch's stream object for the handle, made once; the
    default streams (0, 1 legacy, 2 per-thread) as torch's default stream. Other libraries'
    arrays are left alone."""
    made = []

    class ExternalStream:
        def __init__(self, handle, device):
            made.append(("external", handle, device))

    def default_stream(device):
        made.append(("default", device))
        return "default"

    monkeypatch.setitem(
        sys.modules,
        "torch",
        SimpleNamespace(cuda=SimpleNamespace(ExternalStream=ExternalStream, default_stream=default_stream)),
    )
    monkeypatch.setattr(device_arrays, "_torch_streams", {})

    class Tensor:
        def __init__(self, device="cuda:1"):
            self.device, self.recorded = device, []

        def record_stream(self, stream):
            self.recorded.append(stream)

    def described(obj, library="torch"):
        return SimpleNamespace(library=library, obj=obj, device=1, producer_stream=None)

    t, u, c, v = Tensor(), Tensor(), Tensor(), Tensor("cuda:0")
    device_arrays.hold_for_stream(7, [described(t), described(u), described(c, "cupy")])
    device_arrays.hold_for_stream(7, [described(t), described(v)])
    assert made == [("external", 7, "cuda:1"), ("external", 7, "cuda:0")]  # one object a stream and GPU
    assert len(t.recorded) == 2 and t.recorded[0] is t.recorded[1] is u.recorded[0]
    assert isinstance(v.recorded[0], ExternalStream) and v.recorded[0] is not t.recorded[0]
    assert c.recorded == []
    for legacy in (0, 1, 2):
        device_arrays.hold_for_stream(legacy, [described(t)])
        assert t.recorded[-1] == "default"
    assert made[2:] == [("default", "cuda:1")] * 3


def test_outputs_are_allocated_for_the_stream_the_work_goes_on(recorded, monkeypatch):
    """cupy (and torch) reuse a dropped array's memory in the order of the stream it was
    allocated for: an output pycomm makes is allocated for the work's stream, not the current."""
    allocated_for, current = [], [SimpleNamespace(ptr=100)]

    class ExternalStream:
        def __init__(self, ptr, device_id=-1):
            self.ptr = ptr

        def __enter__(self):
            current.append(self)

        def __exit__(self, *exc):
            current.pop()

    def empty(shape, dtype):
        allocated_for.append(current[-1].ptr)
        return CupyLikeArray(shape, dtype)

    cuda = SimpleNamespace(ExternalStream=ExternalStream, Device=lambda device: nullcontext())
    cuda.get_current_stream = lambda device_id=-1: current[-1]
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=cuda, empty=empty))
    x = CupyLikeArray((4,))
    for stream in (None, 7, 100, 2):  # 2: the per-thread default stream has no object: current
        recorded.allreduce(x, stream=stream)
    assert allocated_for == [100, 7, 100, 100]
    assert [args[-1] for _, args in recorded._native.calls] == [100, 7, 100, 2]

    # cupy 14 deprecates ExternalStream for Stream.from_external (the CUDA stream protocol).
    class Stream:
        @staticmethod
        def from_external(obj):
            return ExternalStream(obj.__cuda_stream__()[1])

    def deprecated(*args):
        raise DeprecationWarning("ExternalStream is deprecated")

    cuda.Stream, cuda.ExternalStream = Stream, deprecated
    recorded.allreduce(x, stream=8)
    assert allocated_for[-1] == 8


class MaybeOnGpu:
    """Like a jax array: its class defines __cuda_array_interface__, which raises for an array in
    host memory (that one speaks DLPack as a CPU array)."""

    def __init__(self, array, gpu_ptr=None):
        self.array, self.gpu_ptr = array, gpu_ptr

    @property
    def __cuda_array_interface__(self):
        if self.gpu_ptr is None:
            raise AttributeError("not on a GPU")
        return {"shape": self.array.shape, "typestr": self.array.dtype.str, "data": (self.gpu_ptr, False), "version": 3}

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, stream=None, **kwargs):
        return self.array.__dlpack__(stream=stream, **kwargs)


def test_a_class_with_the_interface_is_still_asked_array_by_array(comm):
    host, gpu = MaybeOnGpu(np.arange(3.0)), MaybeOnGpu(np.arange(3.0), gpu_ptr=4096)
    for _ in range(2):  # the second time with what is known of the class
        assert not device_arrays.is_device_array(host) and device_arrays.is_device_array(gpu)
        assert np.array_equal(comm.allreduce(host), np.arange(3.0))
        assert device_arrays.describe(gpu).ptr == 4096


def test_no_output_allocator_for_unknown_libraries(comm):
    with pytest.raises(TypeError, match="out="):
        comm.allreduce(FakeDeviceArray((3,)))


def test_import_pulls_in_neither_torch_nor_cupy():
    import subprocess
    import sys

    code = "import sys, pycomm; print(any(m in sys.modules for m in ('torch', 'cupy', 'jax')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# -- arrays that speak only DLPack ---------------------------------------------------------------


def _patch_dltensor(capsule, code=None, lanes=None):
    """Rewrites fields of a legacy capsule's DLTensor, at dlpack.h's offsets: dtype code at byte 20,
    lanes at 22 (data 0, device 8, ndim 16)."""
    get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    tensor = get(capsule, b"dltensor")
    if code is not None:
        ctypes.c_uint8.from_address(tensor + 20).value = code
    if lanes is not None:
        ctypes.c_uint16.from_address(tensor + 22).value = lanes


_current_gpu = []  # the GPUs the stand-in device scopes made current, innermost last


@contextmanager
def _recorded_device_scope(device):
    _current_gpu.append(device)
    try:
        yield
    finally:
        _current_gpu.pop()


@pytest.fixture(autouse=True)
def gpu_scopes_recorded(monkeypatch):
    """No GPU can be made current here: DLPack exports run in a stand-in scope that says which."""
    monkeypatch.setattr(device_arrays, "_device_scope", _recorded_device_scope)


class FakeDLPackArray:
    """Speaks only DLPack and says it is on a CUDA device; its capsule is a numpy array's (whose
    struct says CPU: pycomm must take the device from __dlpack_device__). Memory never touched.
    Records the streams it was exported for."""

    def __init__(self, array, device=(2, 0), code=None, lanes=None, versioned=False):
        self.array, self.device, self.code, self.lanes, self.versioned = array, device, code, lanes, versioned
        self.streams, self.exported_on = [], []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        self.exported_on.append(_current_gpu[-1] if _current_gpu else None)
        if self.versioned:
            return self.array.__dlpack__(max_version=(1, 0))
        capsule = self.array.__dlpack__()
        _patch_dltensor(capsule, self.code, self.lanes)
        return capsule


class NativeRecorder:
    """Stands in for a communicator's native core: records the *_device calls (and the streams
    ordered before them), says device
    pointers at or above GPU1_FROM are on GPU 1 (the others on GPU 0), passes the rest on."""

    GPU1_FROM = 0x7F8000000000

    def __init__(self, native):
        self.native, self.calls = native, []

    def device_of(self, ptr):
        return int(ptr >= self.GPU1_FROM)

    def __getattr__(self, name):
        if name.endswith("_device") or name == "order_after_stream":
            return lambda *args: self.calls.append((name, args))
        return getattr(self.native, name)


# A communicator's place in calls that need only its native core's device_of.
RECORDED = SimpleNamespace(_native=NativeRecorder(None))


@pytest.fixture
def recorded(comm):
    comm._native = NativeRecorder(comm._native)
    yield comm
    comm._native = comm._native.native


def test_dlpack_describe_reads_the_capsule():
    base = np.zeros((5, 4), np.float32)
    a = base[2:]  # data that does not start at the allocation
    f = FakeDLPackArray(a, device=(2, 1))
    d = device_arrays.describe(f, stream=5)
    assert (d.ptr, d.shape, d.dtype, d.device, d.library) == (a.ctypes.data, (3, 4), np.dtype(np.float32), 1, "dlpack")
    assert type(d.keep).__name__ == "PyCapsule" and d.obj is f
    assert f.streams == [5]
    assert f.exported_on == [1] and not _current_gpu  # its GPU current for the export, then not
    assert device_arrays.is_device_array(f)
    assert device_arrays.describe(FakeDLPackArray(np.zeros(2, np.int64), device=(13, 0))).dtype == np.int64  # managed


def test_dlpack_bfloat16_and_contiguous_layouts():
    import ml_dtypes

    d = device_arrays.describe(FakeDLPackArray(np.zeros(3, np.float16), code=4))  # kDLBfloat, 16 bits
    assert d.dtype == np.dtype(ml_dtypes.bfloat16)
    # Strides of extent-1 axes do not matter; nor do an empty array's; 0-d arrays have none.
    odd = np.lib.stride_tricks.as_strided(np.zeros(64, np.float32), shape=(1, 3), strides=(40, 4))
    assert device_arrays.describe(FakeDLPackArray(odd)).shape == (1, 3)
    assert device_arrays.describe(FakeDLPackArray(np.zeros((4, 0), np.float32)[:, ::-1])).shape == (4, 0)
    assert device_arrays.describe(FakeDLPackArray(np.zeros((), np.float64))).shape == ()


@pytest.mark.parametrize(
    "stream,exported,handle",
    [(None, 1, 0), (0, 1, 0), (2, 1, 2), (5, 5, 5), (TorchLikeStream(), 77, 77), (CupyLikeStream(), 88, 88)],
)
def test_dlpack_exports_for_the_stream_the_work_goes_on(stream, exported, handle):
    """DLPack never takes stream 0: pycomm's 0 (the legacy default stream) is exported as 1; so is
    2, the per-thread default stream, which torch refuses to export for and which waits for the
    legacy stream's work."""
    f = FakeDLPackArray(np.zeros(3, np.float32))
    d = device_arrays.describe(f, stream=stream)
    assert f.streams == [exported]
    assert device_arrays.stream_handle(d, stream) == handle


@pytest.mark.parametrize("stream,exported,handle", [(None, 1, 0), (7, 7, 7), (CupyLikeStream(), 88, 88)])
def test_dlpack_collectives_pass_one_stream(recorded, stream, exported, handle):
    """x and out are exported for the very stream the native call is given, in every collective."""
    x, out = FakeDLPackArray(np.zeros((3, 2), np.float32)), FakeDLPackArray(np.zeros((3, 2), np.float32))
    assert recorded.allreduce(x, out=out, stream=stream) is out
    assert recorded.allreduce_async(x, out=x, stream=stream).wait() is x
    rows = FakeDLPackArray(np.zeros((3, 2), np.float32))
    assert recorded.reduce_scatter(x, out=rows, stream=stream) is rows  # P = 1: all the rows
    assert recorded.allgather(x, out=rows, stream=stream) is rows
    assert recorded.broadcast(x, stream=stream) is x
    names = [name.removesuffix("_device") for name, _ in recorded._native.calls]
    assert names == ["allreduce", "allreduce", "reduce_scatter", "allgather", "broadcast"]
    for name, args in recorded._native.calls:
        assert args[-1] == handle and args[-2] == 0, (name, args)  # stream, device
        assert args[0] == x.array.ctypes.data
    assert recorded._native.calls[0][1][1] == out.array.ctypes.data
    # In place (out=x) x is exported once, as input and output both.
    assert x.streams == [exported] * 5 and out.streams == [exported] and rows.streams == [exported] * 2


def test_dlpack_output_of_another_kind_is_exported_for_xs_stream(comm):
    """x with __cuda_array_interface__ on stream 7: a DLPack out is exported for that stream."""
    out = FakeDLPackArray(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="shape"):
        comm.allreduce(FakeDeviceArray((3,), stream=7), out=out)
    assert out.streams == [7]


@pytest.mark.parametrize(
    "array,error,match",
    [
        (FakeDLPackArray(np.zeros((4, 6), np.float32)[:, ::2]), ValueError, "contiguous"),
        (FakeDLPackArray(np.zeros((3, 4), np.float32).T), ValueError, "contiguous"),
        (FakeDLPackArray(np.zeros(3, np.complex64)), TypeError, "not supported"),
        (FakeDLPackArray(np.zeros(3, np.bool_)), TypeError, "not supported"),
        (FakeDLPackArray(np.zeros(3, np.int16)), TypeError, "not supported"),
        (FakeDLPackArray(np.zeros(3, np.float32), lanes=2), TypeError, "2 lanes"),
        (FakeDLPackArray(np.zeros(3, np.float32), code=3), TypeError, "code 3"),  # kDLOpaqueHandle
        (FakeDLPackArray(np.zeros(3, np.float32), device=(10, 0)), TypeError, "device type 10"),  # ROCm
        (FakeDLPackArray(np.zeros(3, np.float32), versioned=True), TypeError, "capsule"),
    ],
)
def test_bad_dlpack_arrays_raise_before_anything_is_sent(recorded, array, error, match):
    for call in (recorded.allreduce, recorded.broadcast, recorded.allgather):
        with pytest.raises(error, match=match):
            call(array)
    assert recorded._native.calls == []
    assert np.array_equal(recorded.allreduce(np.ones(2)), np.ones(2))  # still usable


def test_bad_dlpack_outputs_raise_before_anything_is_sent(recorded):
    x = FakeDLPackArray(np.zeros(3, np.float32))
    cases = [
        (None, TypeError, "out="),  # pycomm cannot allocate one
        (np.zeros(3, np.float32), TypeError, "device array"),
        (FakeDLPackArray(np.zeros(4, np.float32)), ValueError, "shape"),
        (FakeDLPackArray(np.zeros(3, np.float64)), TypeError, "dtype"),
        (FakeDLPackArray(np.zeros(3, np.float32), device=(2, 1)), ValueError, "GPU 1"),
        (FakeDLPackArray(x.array[1:]), ValueError, "shape"),
    ]
    for out, error, match in cases:
        with pytest.raises(error, match=match):
            recorded.allreduce(x, out=out)
    big = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        recorded.allreduce(FakeDLPackArray(big[:3]), out=FakeDLPackArray(big[1:]))
    assert recorded._native.calls == []


class HostDLPackArray:
    """Speaks only DLPack, from a numpy array's memory: CPU (1) or CUDA pinned host memory (3).
    versioned=False: a producer with only the legacy __dlpack__(stream=None)."""

    def __init__(self, array, device_type=1, versioned=True):
        self.array, self.device_type, self.versioned = array, device_type, versioned

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, stream=None, **kwargs):
        if not self.versioned and kwargs:
            raise TypeError("unexpected keyword arguments")  # as a legacy producer would
        return self.array.__dlpack__(stream=stream, **kwargs)


@pytest.mark.parametrize("device_type", [1, 3])
def test_host_dlpack_arrays_take_the_numpy_path(comm, device_type):
    def wrap(a):
        return HostDLPackArray(a, device_type)

    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert not device_arrays.is_device_array(wrap(a))
    y = comm.allreduce(wrap(a))
    assert type(y) is np.ndarray and np.array_equal(y, a)
    b = np.zeros_like(a)
    out = wrap(b)
    assert comm.allreduce(wrap(a), out=out) is out and np.array_equal(b, a)
    x = wrap(a.copy())
    assert comm.allreduce(x, op="max", out=x) is x and np.array_equal(x.array, a)
    b[...] = 0
    assert comm.allreduce_async(wrap(a), out=out).wait() is out and np.array_equal(b, a)
    y = comm.allreduce_async(wrap(a)).wait()
    assert type(y) is np.ndarray and np.array_equal(y, a)
    y = comm.reduce_scatter(wrap(a))
    assert type(y) is np.ndarray and np.array_equal(y, a)
    y = comm.allgather(wrap(a))
    assert type(y) is np.ndarray and np.array_equal(y, a)
    assert comm.broadcast(x) is x and np.array_equal(x.array, a)
    b[...] = 0
    assert np.array_equal(comm.allreduce(a, out=wrap(b)).array, a) and np.array_equal(b, a)  # numpy x, DLPack out


def test_host_dlpack_read_only_views_cannot_be_written(comm):
    """numpy (2.x) takes what a legacy, unversioned __dlpack__() gives as read-only: such arrays
    reduce out of place, but in place (out=x, broadcast) raises before anything is sent."""
    a = np.arange(4, dtype=np.float64)
    legacy = HostDLPackArray(a, versioned=False)
    assert np.array_equal(comm.allreduce(legacy), a)
    with pytest.raises(ValueError, match="read-only.*DLPack"):
        comm.allreduce(legacy, out=legacy)
    with pytest.raises(ValueError, match="read-only.*DLPack"):
        comm.broadcast(legacy)
    frozen = a.copy()
    frozen.flags.writeable = False  # flagged read-only by a versioned export
    with pytest.raises(ValueError, match="read-only"):
        comm.reduce_scatter(a, out=HostDLPackArray(frozen))
    assert np.array_equal(comm.allreduce(np.ones(2)), np.ones(2))  # still usable


def test_dlpack_arrays_on_other_devices_are_refused(comm):
    with pytest.raises(TypeError, match="device type 10"):
        comm.allreduce(np.ones(3), out=HostDLPackArray(np.zeros(3), device_type=10))
    with pytest.raises(TypeError, match="device type 4"):
        comm.allreduce(HostDLPackArray(np.zeros(3), device_type=4))  # OpenCL


def test_device_allgather_x_may_live_in_out_only_as_its_own_block(comm):
    """In place, x is this rank's block of out; anywhere else in out the copies would overwrite x
    before every rank has read it: refused before anything is sent."""
    out = FakeDeviceArray((4,), ptr=0x7F0000000000)
    with pytest.raises(ValueError, match="own block|this rank's block"):
        comm.allgather(FakeDeviceArray((4,), ptr=0x7F0000000004), out=out)  # P = 1: the block is all of out


@pytest.mark.parametrize("offset, refused", [(0, True), (16, False), (8, True)])
def test_device_allgather_own_block_on_a_later_rank(offset, refused):
    """On rank 1 of 2, x may be out's second block (in place) but not its first, nor straddle."""
    from types import SimpleNamespace

    from pycomm.communicator import Communicator

    base = 0x7F0000000000
    x = device_arrays.describe(FakeDeviceArray((4,), ptr=base + offset))
    out = FakeDeviceArray((8,), ptr=base)
    own_block = Communicator._own_block_at(SimpleNamespace(rank=1), x.shape, x.dtype)
    check = partial(Communicator._device_output, RECORDED, x, out, (8,), 0, x_in_out_at=own_block)
    if refused:
        with pytest.raises(ValueError, match="this rank's block"):
            check()
    else:
        assert check().ptr == base


@pytest.mark.parametrize(
    "rank, offset, refused", [(1, 0, True), (1, 16, False), (1, 8, True), (0, 0, False), (0, 16, True)]
)
def test_device_reduce_scatter_out_only_as_own_block_of_x(rank, offset, refused):
    """out may be x's block of this rank (NCCL's in place) but not another's, where that rank
    reads every rank's x while this rank may already write its result, nor straddle."""
    from types import SimpleNamespace

    from pycomm.communicator import Communicator

    base = 0x7F0000000000
    x = device_arrays.describe(FakeDeviceArray((8,), ptr=base))
    out = FakeDeviceArray((4,), ptr=base + offset)
    own_block = Communicator._own_block_at(SimpleNamespace(rank=rank), (4,), x.dtype)
    check = partial(Communicator._device_output, RECORDED, x, out, (4,), 0, out_in_x_at=own_block)
    if refused:
        with pytest.raises(ValueError, match="out = x\\[rank"):
            check()
    else:
        assert check().ptr == base + offset


def test_torch_optimizer_keeps_each_bucket_on_its_parameters_device(comm):
    """DistributedOptimizer's buckets live where their parameters do (so CUDA gradients take the
    device path and never visit the host), one device per bucket; "meta" stands in for a GPU."""
    torch = pytest.importorskip("torch")
    import pycomm.torch as pt

    params = [torch.nn.Parameter(torch.zeros(3, device=d)) for d in ("meta", "cpu", "meta", "cpu")]
    opt = pt.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), comm=comm)
    devices = sorted(str(b.buffer.device) for b in opt._buckets)
    assert devices == ["cpu", "meta"]
    for bucket in opt._buckets:
        assert all(p.device == bucket.buffer.device for p in bucket.params)
        assert all(view.device == p.device and view.shape == p.shape for p, view in bucket.views.items())


def test_torch_optimizer_issues_each_bucket_once_when_hooks_race(comm, monkeypatch):
    """Autograd runs a model's CPU and CUDA gradient hooks on threads of their own: however they
    interleave, every bucket's allreduce starts exactly once, in bucket order (what every rank
    must issue alike). A slow allreduce_async widens the window between the check and the start."""
    torch = pytest.importorskip("torch")
    import threading
    import time

    import pycomm.torch as pt

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(12)]
    opt = pt.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), comm=comm, bucket_mb=1e-9)
    assert len(opt._buckets) == len(params)  # one parameter each
    grads = opt._pycomm  # the optimizer's own communicator, a dup() of comm
    assert grads is not comm and grads.size == comm.size
    issued, start = [], grads.allreduce_async

    def slow_start(buffer, **kwargs):
        issued.append(next(i for i, b in enumerate(opt._buckets) if b.buffer is buffer))
        time.sleep(0.002)
        return start(buffer, **kwargs)

    monkeypatch.setattr(grads, "allreduce_async", slow_start)
    order = [p for b in opt._buckets for p in b.params]
    for p in params:
        p.grad = torch.ones_like(p)
    threads = [threading.Thread(target=lambda ps=order[k::2]: [opt._grad_ready(p) for p in ps]) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert issued == list(range(len(params)))
    opt.synchronize()
    assert all(torch.equal(p.grad, torch.ones(2)) for p in params)


def test_device_calls_mark_the_communicator_before_they_are_issued(recorded, monkeypatch):
    """Closing a communicator after device work meets the node's other ranks, so a GC'd
    optimizer's dup is then left to the exit hook (Communicator._close_now_or_at_exit): every
    device collective says so before it is issued, the in-place fast path too; host calls do not."""
    x = FakeDeviceArray((3,))
    for call in (
        lambda: recorded.allreduce(np.ones(3)),
        lambda: recorded.allreduce_async(np.ones(3)).wait(),
        lambda: recorded.reduce_scatter(np.ones(2 * recorded.size)),
        lambda: recorded.allgather(np.ones(3)),
        lambda: recorded.broadcast(np.ones(3)),
    ):
        call()
    assert not recorded._ran_on_device
    plain = ("cai", 4096, 3, dtype_code(np.dtype(np.float32)), 0, 0)  # as for a torch CUDA tensor
    monkeypatch.setattr(device_arrays, "plain_in_place", lambda a: plain if a is x else None)
    device_calls = (
        lambda: recorded.allreduce(x, out=x),  # the fast path
        lambda: recorded.allreduce(x, out=FakeDeviceArray((3,), ptr=4096)),
        lambda: recorded.allreduce_async(x, out=FakeDeviceArray((3,), ptr=4096)),
        lambda: recorded.reduce_scatter(FakeDeviceArray((2 * recorded.size,)), out=FakeDeviceArray((2,), ptr=1 << 40)),
        lambda: recorded.allgather(x, out=FakeDeviceArray((3 * recorded.size,), ptr=1 << 40)),
        lambda: recorded.broadcast(x),
    )
    for call in device_calls:
        recorded._ran_on_device = False
        call()
        assert recorded._ran_on_device
    assert len(recorded._native.calls) == len(device_calls)


def test_arrays_naming_another_stream_are_waited_for_on_the_gpu(recorded):
    """__cuda_array_interface__ leaves ordering to the consumer: where x (with stream=) or out
    names a stream other than the work's, the work stream first waits for it (no host wait);
    an array on the work's own stream, or naming none, needs nothing."""
    x, out = FakeDeviceArray((4,), stream=5, ptr=4096), FakeDeviceArray((4,), stream=7, ptr=8192)
    recorded.allreduce(x, out=out)  # on x's stream, 5: out's 7 is waited for
    recorded.allreduce(x, out=x, stream=9)  # x's 5, once
    recorded.allreduce(FakeDeviceArray((4,), ptr=4096), out=FakeDeviceArray((4,), ptr=8192), stream=9)
    recorded.broadcast(x, root=0, stream=5)
    recorded.reduce_scatter(
        FakeDeviceArray((2 * recorded.size,), stream=5), out=FakeDeviceArray((2,), stream=7, ptr=1 << 40)
    )
    empty = FakeDeviceArray((0,), stream=5, ptr=0)
    recorded.allreduce(empty, out=FakeDeviceArray((0,), stream=7, ptr=0), stream=9)  # no elements: none to order
    names = [(name, args[1:]) if name == "order_after_stream" else name for name, args in recorded._native.calls]
    assert names == [
        ("order_after_stream", (5, 7)),
        "allreduce_device",
        ("order_after_stream", (9, 5)),
        "allreduce_device",
        "allreduce_device",
        "broadcast_device",
        ("order_after_stream", (5, 7)),
        "reduce_scatter_device",
        "allreduce_device",
    ]
    # Bad input is refused before anything is queued, the ordering included.
    with pytest.raises(TypeError):
        recorded.allreduce(x, out=FakeDeviceArray((4,), "<f8", stream=7, ptr=8192))
    assert len(recorded._native.calls) == len(names)


def test_the_native_device_scope_lets_exceptions_through():
    """The real DeviceScope (stood in for elsewhere here): its __exit__ returns nothing, so an
    exception inside the block is not swallowed; entering it without a usable GPU raises."""
    from pycomm._native import _core

    assert _core.DeviceScope(0).__exit__(None, None, None) is None
    if not _core.built_with_cuda() or not gpu_present():
        with pytest.raises(pycomm.CommError):
            with _core.DeviceScope(0):
                pass
