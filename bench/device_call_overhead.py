"""What a device call costs in Python before it reaches the native core, measured without a GPU.

A small GPU allreduce has a budget of about 20 us per call (issue 4) and the Python layer is paid
on every call, on every rank. This times `comm.allreduce(x, out=x)` on arrays that look like
cupy arrays (a class from module "cupy" with cupy's attributes) and like other
__cuda_array_interface__ producers, with the native core's device entry replaced by a no-op,
against mpi4py's `MPI.COMM_SELF.Allreduce` of 8 bytes, the Python cost of one MPI call, timed in
the same run. Prints the median of --repeat runs of --calls calls each.

    python bench/device_call_overhead.py
"""

import argparse
import statistics
import sys
import timeit
import types

import numpy as np


class CaiArray:
    """Any producer of __cuda_array_interface__ (a property that builds the dict on each read)."""

    def __init__(self, n):
        self._host = np.zeros(n, np.float32)  # stands in for device memory: never touched
        self.shape, self.dtype = self._host.shape, self._host.dtype

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self._host.ctypes.data, False),
            "strides": None,
            "version": 3,
            "stream": 1,
        }


class CupyLikeArray(CaiArray):
    """cupy.ndarray's attributes, as pycomm reads them."""

    def __init__(self, n):
        super().__init__(n)
        self.size = self._host.size
        self.data = types.SimpleNamespace(ptr=self._host.ctypes.data)
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.device = types.SimpleNamespace(id=0)


CupyLikeArray.__module__ = "cupy"


def torch_like_tensor(n):
    """A CPU tensor that says it is on a GPU (None without torch): a subclass, whose attribute
    reads cost about twice a plain tensor's, so its time is an upper bound. torch's raw current
    stream is stood in for where this torch has none (a CPU build)."""
    try:
        import torch
    except ImportError:
        return None

    class OnGpu(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl

        @property
        def is_cuda(self):
            return True

    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # for the rest of this process
        torch._C._cuda_getCurrentRawStream = lambda device: 0
    return torch.zeros(n).as_subclass(OnGpu)


def per_call_us(fn, calls: int, repeat: int) -> float:
    return statistics.median(t / calls * 1e6 for t in timeit.repeat(fn, number=calls, repeat=repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from mpi4py import MPI

    import pycomm

    # The current stream, as cupy would give it; only looked up, never used.
    stream = types.SimpleNamespace(ptr=0)
    cuda = types.SimpleNamespace(get_current_stream=lambda device_id=-1: stream)
    sys.modules.setdefault("cupy", types.SimpleNamespace(cuda=cuda))

    comm = pycomm.Communicator(MPI.COMM_SELF)
    native = comm._native

    class NoDeviceWork:
        """The native core, but device calls return at once."""

        def __getattr__(self, name):
            return getattr(native, name)

        def allreduce_device(self, *args):
            pass

    comm._native = NoDeviceWork()
    try:
        buf = np.zeros(2, np.float32)
        baseline = per_call_us(lambda: MPI.COMM_SELF.Allreduce(MPI.IN_PLACE, buf), args.calls, args.repeat)
        print(f"{'call':50s} {'us/call':>8s} {'vs MPI':>7s}")
        print(f"{'mpi4py COMM_SELF.Allreduce, 8 B (baseline)':50s} {baseline:8.2f} {1.0:7.2f}")
        arrays = [("cupy-like array", CupyLikeArray(2)), ("interface-only array", CaiArray(2))]
        tensor = torch_like_tensor(2)
        if tensor is not None:
            arrays.append(("torch tensor (a subclass on the CPU)", tensor))
        for name, array in arrays:
            cost = per_call_us(lambda a=array: comm.allreduce(a, out=a), args.calls, args.repeat)
            print(f"{'pycomm allreduce(x, out=x), ' + name:50s} {cost:8.2f} {cost / baseline:7.2f}")
    finally:
        comm._native = native
        comm.close()


if __name__ == "__main__":
    main()
