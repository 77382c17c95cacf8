"""Device-array handling that needs no GPU: reading __cuda_array_interface__, argument checks that
must fail on the calling rank before any CUDA call or message, and stream handles."""

import numpy as np
import pytest

import pycomm
from pycomm import device_arrays


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
    assert (d.ptr, d.shape, d.dtype, d.device, d.library) == (4096, (3, 4), np.dtype(np.float16), 0, "cai")
    assert device_arrays.is_device_array(d.obj) and not device_arrays.is_device_array(np.ones(3))


def test_c_contiguous_strides_are_accepted():
    assert device_arrays.describe(FakeDeviceArray((3, 4), strides=(16, 4))).shape == (3, 4)


@pytest.mark.parametrize(
    "array,error,match",
    [
        (FakeDeviceArray((3, 4), strides=(4, 12)), ValueError, "contiguous"),
        (FakeDeviceArray((3,), readonly=True), ValueError, "read-only"),
        (FakeDeviceArray((3,), "<c8"), TypeError, "not supported"),
        (FakeDeviceArray((3,), "|b1"), TypeError, "not supported"),
    ],
)
def test_bad_device_arrays_raise_before_anything_is_sent(comm, array, error, match):
    with pytest.raises(error, match=match):
        comm.allreduce(array)
    assert np.array_equal(comm.allreduce(np.ones(2)), np.ones(2))  # still usable


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


def test_no_output_allocator_for_unknown_libraries(comm):
    with pytest.raises(TypeError, match="out="):
        comm.allreduce(FakeDeviceArray((3,)))


def test_import_pulls_in_neither_torch_nor_cupy():
    import subprocess
    import sys

    code = "import sys, pycomm; print(any(m in sys.modules for m in ('torch', 'cupy')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
