"""Device arrays on one GPU shared by every rank: run under mpirun by tests/test_gpu_mpi.py.

usage: gpu.py torch|cupy
"""

import sys

import ml_dtypes
import numpy as np
from common import Failures, dtype_op_cases, make_input, matches, np_dtype, same_on_all_ranks
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank
LIBRARY = sys.argv[1]
SIZES = (0, 1, 7, 1000, 4099, (1 << 20) + 3)


class Torch:
    def __init__(self):
        import torch

        self.torch = torch
        torch.cuda.set_device(0)

    def to_device(self, a: np.ndarray):
        torch = self.torch
        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
        return torch.from_numpy(a.copy()).cuda()

    def to_host(self, t) -> np.ndarray:
        torch = self.torch
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy()

    def empty_like(self, t):
        return self.torch.empty_like(t)

    def sync(self):
        self.torch.cuda.synchronize()

    def free_cached(self):
        self.torch.cuda.empty_cache()


class Cupy:
    def __init__(self):
        import cupy

        self.cupy = cupy
        cupy.cuda.Device(0).use()

    def to_device(self, a):
        return self.cupy.asarray(a)

    def to_host(self, x):
        return self.cupy.asnumpy(x)

    def empty_like(self, x):
        return self.cupy.empty_like(x)

    def sync(self):
        self.cupy.cuda.runtime.deviceSynchronize()

    def free_cached(self):
        self.cupy.get_default_memory_pool().free_all_blocks()


def supported(lib, name) -> bool:
    """Whether the library has this dtype (cupy has no bfloat16: it keeps ml_dtypes' as raw bytes)."""
    try:
        back = lib.to_host(lib.to_device(np.zeros(2, np_dtype(name))))
    except (TypeError, ValueError, RuntimeError):
        return False
    return back.dtype == np_dtype(name)


def check_allreduce(comm, lib, failures):
    for name in pycomm.SUPPORTED_DTYPES:
        if not supported(lib, name):
            if RANK == 0:
                print(f"note: {LIBRARY} has no {name}; skipped")
            continue
        for _, dtype, op in dtype_op_cases([name]):
            for n in SIZES:
                inputs = [make_input(q, n, dtype, op) for q in range(P)]
                x = lib.to_device(inputs[RANK])
                case = f"{LIBRARY} allreduce {name} {op} n={n}"
                y = comm.allreduce(x, op=op)
                got = lib.to_host(y)
                failures.check(type(y) is type(x), f"{case}: result type {type(y)}")
                failures.check(matches(got, inputs, dtype, op), f"{case}: {got[:4]}")
                failures.check(same_on_all_ranks(got), f"{case}: ranks differ")
                out = lib.empty_like(x)
                comm.allreduce(x, op=op, out=out)
                failures.check(np.array_equal(lib.to_host(out).view(np.uint8), got.view(np.uint8)), f"{case} out=")
                comm.allreduce(x, op=op, out=x)
                failures.check(np.array_equal(lib.to_host(x).view(np.uint8), got.view(np.uint8)), f"{case} in place")


def check_other_collectives(comm, lib, failures):
    dtype = np.dtype(np.float32)
    for rows in (0, 1, 33):
        inputs = [make_input(q, rows * P * 4, dtype, "sum").reshape(rows * P, 4) for q in range(P)]
        block = lib.to_host(comm.reduce_scatter(lib.to_device(inputs[RANK])))
        parts = [x[RANK * rows : (RANK + 1) * rows].ravel() for x in inputs]
        ok = block.shape == (rows, 4) and matches(block.ravel(), parts, dtype, "sum")
        failures.check(ok, f"reduce_scatter rows={rows}")
        # In place (NCCL's form): out is this rank's block of x.
        x = lib.to_device(inputs[RANK])
        comm.reduce_scatter(x, out=x[RANK * rows : (RANK + 1) * rows])
        in_place = lib.to_host(x[RANK * rows : (RANK + 1) * rows])
        failures.check(np.array_equal(in_place, block), f"reduce_scatter in place rows={rows}")
        gathered = lib.to_host(comm.allgather(lib.to_device(inputs[RANK][:rows])))
        want = np.concatenate([x[:rows] for x in inputs])
        failures.check(np.array_equal(gathered, want), f"allgather rows={rows}")
        # In place: x is this rank's block of out.
        out = lib.to_device(np.zeros((P * rows, 4), dtype))
        out[RANK * rows : (RANK + 1) * rows] = lib.to_device(inputs[RANK][:rows])
        comm.allgather(out[RANK * rows : (RANK + 1) * rows], out=out)
        failures.check(np.array_equal(lib.to_host(out), want), f"allgather in place rows={rows}")
    for root in range(P):
        buf = lib.to_device(make_input(RANK + 10, 5000, dtype, "sum"))
        comm.broadcast(buf, root=root)
        failures.check(np.array_equal(lib.to_host(buf), make_input(root + 10, 5000, dtype, "sum")), f"broadcast {root}")


def check_stream_order(comm, lib, failures):
    """Work queued after the allreduce on the same (non-default) stream sees its result, without
    any host synchronisation in between."""
    n = 1 << 22
    if LIBRARY == "torch":
        torch = lib.torch
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            x = torch.full((n,), float(RANK + 1), device="cuda")
            for _ in range(3):
                comm.allreduce(x, out=x)
            z = x * 2
        stream.synchronize()
    else:
        cupy = lib.cupy
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x = cupy.full((n,), float(RANK + 1), dtype=cupy.float32)
            for _ in range(3):
                comm.allreduce(x, out=x)
            z = x * 2
        stream.synchronize()
    # After the first call every rank holds S = P(P+1)/2; each later call multiplies by P.
    expected = 2 * (P * (P + 1) / 2) * P * P
    got = lib.to_host(z)
    failures.check(bool(np.all(got == expected)), f"stream order: {got[:3]} != {expected}")
    # Out of place on that stream while the default one is current: the output is allocated for
    # the stream the work goes on.
    y = comm.allreduce(x, stream=stream)
    stream.synchronize()
    got = lib.to_host(y)
    failures.check(bool(np.all(got == expected / 2 * P)), f"out of place on stream=: {got[:3]}")


def check_pool_memory(comm, lib, failures):
    """Stream-ordered pool memory cannot be exported through CUDA IPC: it goes through staging."""
    if LIBRARY != "cupy":
        return
    cupy = lib.cupy
    cupy.cuda.set_allocator(cupy.cuda.MemoryAsyncPool().malloc)
    try:
        x = cupy.full((100003,), RANK + 1, dtype=cupy.int32)
        y = comm.allreduce(x)
        failures.check(bool((y == P * (P + 1) // 2).all()), "allreduce of pool memory")
        comm.allreduce(x, out=x)
        failures.check(bool((x == P * (P + 1) // 2).all()), "in-place allreduce of pool memory")
    finally:
        cupy.cuda.set_allocator(cupy.cuda.MemoryPool().malloc)


class InterfaceOnly:
    """A device array known only by its __cuda_array_interface__ (no library, no .device)."""

    def __init__(self, array):
        self.array = array
        self.__cuda_array_interface__ = array.__cuda_array_interface__


def check_interface_only(comm, lib, failures):
    """Such an array's GPU is asked of the driver; in place and out= work as for the library's own."""
    x = lib.to_device(np.full(1000, RANK + 1.0, np.float32))
    wrapped = InterfaceOnly(x)
    comm.allreduce(wrapped, out=wrapped)
    failures.check(bool(np.all(lib.to_host(x) == P * (P + 1) / 2)), "allreduce of an interface-only array")
    out = lib.empty_like(x)
    comm.allreduce(InterfaceOnly(x), out=InterfaceOnly(out))
    failures.check(bool(np.all(lib.to_host(out) == P * P * (P + 1) / 2)), "interface-only out=")
    # Empty, with the data pointer 0 that the interface allows: nothing to ask the driver about.
    empty = InterfaceOnly(lib.to_device(np.zeros(0, np.float32)))
    empty.__cuda_array_interface__ = dict(empty.__cuda_array_interface__, data=(0, False))
    try:
        comm.allreduce(empty, out=empty)
    except pycomm.CommError as error:
        failures.check(False, f"empty interface-only array: {error}")


def check_mismatch(lib, failures):
    """Rank 0 reduces 10 elements, the others 20: MismatchError on every rank, no garbage."""
    if P == 1:
        return
    with pycomm.Communicator(timeout=60) as comm:
        x = lib.to_device(np.ones(10 if RANK == 0 else 20, np.float32))
        try:
            comm.allreduce(x, out=x)
            failures.check(False, "device calls of different counts were not refused")
        except pycomm.MismatchError as error:
            failures.check("different device calls" in str(error), f"mismatch message: {error}")


def check_unsupported_dtype(comm, lib, failures):
    """A dtype pycomm cannot reduce raises TypeError on the calling rank before anything is sent."""
    x = lib.to_device(np.zeros(4, np.complex64))
    try:
        comm.allreduce(x)
        failures.check(False, "complex64 was accepted")
    except TypeError:
        failures.check(True, "")


def check_dup_over_freed_memory(comm, lib, failures):
    """A rank frees buffers it reduced through `comm` and allocates one likely over their addresses,
    which it reduces through a dup: the process's communicators share their IPC mappings, so the
    dup's mapping is not refused for comm's mappings of the freed buffers (it was, call after
    call, while each communicator had its own)."""
    n = 1 << 20  # 4 MiB of float32 each: segments of their own in torch's and cupy's pools
    with comm.dup() as dup:
        old = [lib.to_device(np.full(n, RANK + 1.0, np.float32)) for _ in range(3)]
        for x in old:
            comm.allreduce(x, out=x)
        lib.sync()
        del old, x
        lib.free_cached()  # back to the driver: the next allocation may reuse the addresses
        new = lib.to_device(np.full(3 * n, RANK + 1.0, np.float32))
        for c, total in ((dup, P * (P + 1) / 2), (comm, P * P * (P + 1) / 2)):
            try:
                c.allreduce(new, out=new)
                got = lib.to_host(new)
                failures.check(bool(np.all(got == total)), f"allreduce over freed memory: {got[:3]}")
            except pycomm.CommError as error:
                failures.check(False, f"allreduce over freed memory: {error}")
                return


def check_torch_optimizer(comm, failures):
    """pycomm.torch's DistributedOptimizer on CUDA parameters: buckets on the GPU, gradients
    averaged there, and a parameter without a gradient this step gets zeros on its GPU."""
    import torch

    import pycomm.torch as pt

    w = torch.nn.Parameter(torch.ones(4, device="cuda"))
    unused = torch.nn.Parameter(torch.ones(3, device="cuda"))
    opt = pt.DistributedOptimizer(torch.optim.SGD([w, unused], lr=1.0), comm=comm)
    failures.check(all(b.buffer.is_cuda for b in opt._buckets), "optimizer buckets on the GPU")
    (w * (RANK + 1)).sum().backward()
    opt.step()
    torch.cuda.synchronize()
    failures.check(bool(torch.all(w.grad == (P + 1) / 2)), f"averaged CUDA gradient: {w.grad.tolist()}")
    failures.check(unused.grad is not None and unused.grad.is_cuda, "zero gradient on the GPU")
    failures.check(unused.grad is not None and not bool(unused.grad.any()), "zero gradient")
    failures.check(bool(torch.all(w == 1 - (P + 1) / 2)), f"SGD step: {w.tolist()}")


def main():
    lib = Torch() if LIBRARY == "torch" else Cupy()
    failures = Failures()
    with pycomm.Communicator() as comm:
        check_allreduce(comm, lib, failures)
        check_other_collectives(comm, lib, failures)
        check_stream_order(comm, lib, failures)
        check_pool_memory(comm, lib, failures)
        check_interface_only(comm, lib, failures)
        check_unsupported_dtype(comm, lib, failures)
        check_dup_over_freed_memory(comm, lib, failures)
        if LIBRARY == "torch":
            check_torch_optimizer(comm, failures)
        # Closing right after queuing work: close() waits for every rank's GPU work before it
        # tears down events and IPC mappings that the queued work still uses.
        last = comm.allreduce(lib.to_device(np.full(1 << 22, RANK + 1.0, np.float32)))
    lib.sync()
    check_mismatch(lib, failures)
    got = lib.to_host(last)
    failures.check(bool(np.all(got == P * (P + 1) / 2)), f"allreduce queued before close: {got[:3]}")
    failures.finish()


if __name__ == "__main__":
    main()
