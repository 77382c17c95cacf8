"""The reduction kernels against numpy, one process, every dtype x op."""

import ml_dtypes
import numpy as np
import pytest

from pycomm import ReduceOp
from pycomm._native import _core
from pycomm.buffers import address
from pycomm.dtypes import SUPPORTED, dtype_code


def np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# Every compiled kernel set this CPU can run; each must give numpy's bits.
ISAS = sorted({"generic", _core.kernel_isa("avx2")})


@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


def run_kernel(a, b, out, op, isa="auto"):
    _core.reduce_kernel(address(a), address(b), address(out), a.size, dtype_code(a.dtype), int(op), isa)
    return out


def numpy_reduce(a, b, op):
    """numpy's answer; float16/bfloat16 computed in float32 and rounded once, as the kernels promise."""
    compute = np.float32 if a.dtype.name in ("float16", "bfloat16") else a.dtype
    x, y = a.astype(compute), b.astype(compute)
    with np.errstate(all="ignore"):
        result = {
            ReduceOp.SUM: np.add,
            ReduceOp.AVG: np.add,
            ReduceOp.PROD: np.multiply,
            ReduceOp.MIN: np.minimum,
            ReduceOp.MAX: np.maximum,
        }[op](x, y)
        return result.astype(a.dtype)


def inputs(dtype, n, seed):
    rng = np.random.default_rng(seed)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)
    return (rng.standard_normal(n) * 100).astype(dtype)


@pytest.mark.parametrize("op", list(ReduceOp))
@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 100_003])
def test_kernel_matches_numpy(name, op, n, isa):
    dtype = np_dtype(name)
    a, b = inputs(dtype, n, 1), inputs(dtype, n, 2)
    out = run_kernel(a, b, np.empty_like(a), op, isa)
    # Bitwise: the kernels round exactly as numpy's casts do (to nearest, ties to even), and
    # integers wrap as numpy's do.
    assert_same(out, numpy_reduce(a, b, op))


def assert_same(out, expected):
    """Bitwise equal, except that any NaN matches any NaN and +0 matches -0 (IEEE leaves the sign
    of NaNs, and which zero min/max return, unspecified)."""
    if out.dtype.kind in "iu":
        assert np.array_equal(out, expected)
        return
    wide_out, wide_expected = out.astype(np.float64), expected.astype(np.float64)
    nan = np.isnan(wide_expected)
    assert np.array_equal(np.isnan(wide_out), nan)
    exact = ~nan & ~((wide_expected == 0) & (wide_out == 0))
    assert np.array_equal(out[exact].view(np.uint8), expected[exact].view(np.uint8))


@pytest.mark.parametrize("name", SUPPORTED)
def test_kernel_in_place(name, isa):
    dtype = np_dtype(name)
    a, b = inputs(dtype, 999, 3), inputs(dtype, 999, 4)
    expected = numpy_reduce(a, b, ReduceOp.SUM)
    run_kernel(a, b, a, ReduceOp.SUM, isa)
    assert_same(a, expected)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_conversions_cover_every_value(name, isa):
    """All 65536 bit patterns go through the float32 round trip as numpy/ml_dtypes would:
    subnormals, infinities, overflow to infinity and NaNs included."""
    dtype = np_dtype(name)
    a = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    for b_value in (0.0, 1.0, -3.5, 60000.0, 2.0**-20):
        b = np.full(a.shape, b_value, dtype)
        for op in (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX):
            assert_same(run_kernel(a, b, np.empty_like(a), op, isa), numpy_reduce(a, b, op))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_scale_down(name, isa):
    dtype = np_dtype(name)
    x = inputs(dtype, 1001, 5)
    expected = (x.astype(np.float64 if name == "float64" else np.float32) / 3).astype(dtype)
    _core.scale_down_kernel(address(x), x.size, dtype_code(dtype), 3, isa)
    assert np.array_equal(x.view(np.uint8), expected.view(np.uint8))


def test_float16_nan_payloads_survive_in_every_kernel_set(isa):
    """Quiet NaNs keep the top of their payload and signalling ones are quieted, as F16C and numpy
    do, in the vector lanes and in the scalar tail alike (so every kernel set gives the same bits)."""
    a = np.array([0x7E01, 0x7C01, 0xFE37, 0x7D55] * 5, np.uint16).view(np.float16)  # 20: 2 vectors + tail
    b = np.ones(a.shape, np.float16)
    out = run_kernel(a, b, np.empty_like(a), ReduceOp.SUM, isa)
    with np.errstate(all="ignore"):
        expected = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    assert out.view(np.uint16).tolist() == expected.view(np.uint16).tolist()
