"""Throughput of the native reduction kernels alone, outside any communication.

These bound what the allreduce can reach on one core: a ring step can never reduce faster than
reduce_kernel. Run with `pytest bench/ --benchmark-only`.
"""

import numpy as np
import pytest

import pycomm
from pycomm._native import _core
from pycomm.bench import numpy_dtype
from pycomm.dtypes import dtype_code

SIZES = {"1MiB": 1 << 20, "64MiB": 64 << 20}


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.fixture(params=list(SIZES), scope="module")
def nbytes(request):
    return SIZES[request.param]


@pytest.mark.parametrize("dtype_name", pycomm.SUPPORTED_DTYPES)
@pytest.mark.benchmark(group="reduce_kernel sum", max_time=0.5, min_rounds=5)
def test_reduce_kernel_sum(benchmark, dtype_name, nbytes):
    dtype = numpy_dtype(dtype_name)
    n = nbytes // dtype.itemsize
    # Small integers keep every sum exact, so the result can be checked bit for bit; np.resize
    # avoids the int64 temporary that arange over the whole array would need.
    a = np.resize(np.arange(7).astype(dtype), n)
    b = np.resize(np.arange(3).astype(dtype), n)
    out = np.empty(n, dtype)
    args = (_address(a), _address(b), _address(out), n, dtype_code(dtype), int(pycomm.ReduceOp.SUM))

    benchmark(_core.reduce_kernel, *args)

    head = slice(0, 1000)
    np.testing.assert_array_equal(out[head], (a[head].astype(np.float64) + b[head]).astype(dtype))
    if benchmark.stats:  # None under --benchmark-disable
        # Two arrays read and one written per call.
        benchmark.extra_info["GB/s (3 x bytes moved)"] = round(3 * nbytes / benchmark.stats.stats.median / 1e9, 2)
