"""Bandwidth of the CPU reduction kernels (out = a + b), each compiled kernel set side by side.

    python bench/kernel_bandwidth.py [--mib 64]

GB/s counts bytes read and written (3 x the buffer size), median of 5 calls, one thread.
"""

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

import pycomm
from pycomm._native import _core
from pycomm.dtypes import dtype_code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size per operand (default 64 MiB)")
    args = parser.parse_args()
    isas = sorted({"generic", _core.kernel_isa("avx2")})
    print(f"# {args.mib} MiB per operand, sum, median of 5; active kernel set: {_core.kernel_isa()}")
    print(f"{'dtype':>10} " + " ".join(f"{isa + ' GB/s':>13}" for isa in isas))
    for name in pycomm.SUPPORTED_DTYPES:
        dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
        n = (args.mib << 20) // dtype.itemsize
        a, b = np.ones(n, dtype), np.ones(n, dtype)
        out = np.empty_like(a)
        addresses = (a.ctypes.data, b.ctypes.data, out.ctypes.data, n, dtype_code(dtype), 0)
        cells = []
        for isa in isas:
            _core.reduce_kernel(*addresses, isa)  # warm: page in the output
            times = []
            for _ in range(5):
                start = time.perf_counter()
                _core.reduce_kernel(*addresses, isa)
                times.append(time.perf_counter() - start)
            cells.append(3 * a.nbytes / statistics.median(times) / 1e9)
        print(f"{name:>10} " + " ".join(f"{c:>13.1f}" for c in cells))


if __name__ == "__main__":
    main()
