"""torch CUDA tensors seen only through DLPack (common.DLPackOnly), on one GPU shared by every
rank: run under mpirun by tests/test_gpu_dlpack_mpi.py.

Without stream= pycomm queues DLPack-only arrays on the legacy default stream, which is torch's
default stream too: reading the results there (x.cpu(), comparisons) is ordered after the work.
"""

import torch
from common import DLPackOnly, Failures
from mpi4py import MPI

import pycomm

P, RANK = MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank
S = P * (P + 1) // 2  # the sum over ranks of RANK + 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8)


def all_equal(t, value) -> bool:
    return bool((t == value).all())


def check_allreduce(comm, failures):
    for dtype in DTYPES:
        for n in (1, 1000, (1 << 20) + 3):
            case = f"{dtype} n={n}"
            # In place: out= the same wrapper.
            x = torch.full((n,), RANK + 1, dtype=dtype, device="cuda")
            w = DLPackOnly(x)
            failures.check(comm.allreduce(w, out=w) is w and all_equal(x, S), f"in place {case}")
            # out= a torch tensor: the result is that tensor; x is left alone.
            x = torch.full((n,), RANK + 1, dtype=dtype, device="cuda")
            y = torch.zeros_like(x)
            failures.check(comm.allreduce(DLPackOnly(x), out=y) is y and all_equal(y, S), f"out=torch {case}")
            failures.check(all_equal(x, RANK + 1), f"x modified {case}")
            # A torch x with a DLPack-only out.
            z = torch.zeros_like(x)
            out = DLPackOnly(z)
            failures.check(comm.allreduce(x, out=out) is out and all_equal(z, S), f"torch x, out=dlpack {case}")
    x = torch.full((P * 6, 2), RANK + 1.0, device="cuda")
    block = torch.zeros((6, 2), device="cuda")
    comm.reduce_scatter(DLPackOnly(x), out=DLPackOnly(block))
    failures.check(all_equal(block, S), "reduce_scatter")
    gathered = torch.zeros((P * 3,), device="cuda")
    comm.allgather(DLPackOnly(torch.full((3,), float(RANK), device="cuda")), out=DLPackOnly(gathered))
    want = torch.arange(P, device="cuda", dtype=torch.float32).repeat_interleave(3)
    failures.check(bool(torch.equal(gathered, want)), f"allgather {gathered.tolist()}")


def check_broadcast(comm, failures):
    for root in range(P):
        buf = torch.full((5000,), float(RANK), device="cuda")
        w = DLPackOnly(buf)
        failures.check(comm.broadcast(w, root=root) is w and all_equal(buf, root), f"broadcast root={root}")


def check_streams(comm, failures):
    """stream=: work queued after the calls on the same side stream sees their result. No
    stream=: x is filled on torch's current (side) stream, which first sleeps; pycomm exports x
    for the legacy default stream, so torch makes that stream wait for the current one before
    pycomm reads x there."""
    n = 1 << 22
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.full((n,), float(RANK + 1), device="cuda")
        w = DLPackOnly(x)
        for _ in range(3):
            comm.allreduce(w, out=w, stream=stream)
        doubled = x * 2
    stream.synchronize()
    # After the first call every rank holds S; each later call multiplies by P.
    failures.check(all_equal(doubled, 2 * S * P * P), f"stream=: {doubled[:3].tolist()}")

    x = torch.zeros((n,), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # about 0.05 s of GPU time before the fill
        x.fill_(RANK + 1)
        w = DLPackOnly(x)
        comm.allreduce(w, out=w)  # on the legacy default stream, after the fill
    failures.check(all_equal(x, S), f"producer's stream: {x[:3].tolist()}")  # read on the default stream


def check_refusals(comm, failures):
    x = torch.zeros((4, 6), device="cuda")
    for label, call, error in (
        ("no out=", lambda: comm.allreduce(DLPackOnly(x)), TypeError),
        ("not contiguous", lambda: comm.allreduce(DLPackOnly(x.t()), out=DLPackOnly(x.t())), ValueError),
        (
            "complex",
            lambda: comm.broadcast(DLPackOnly(torch.zeros(3, dtype=torch.complex64, device="cuda"))),
            TypeError,
        ),
    ):
        try:
            call()
            failures.check(False, f"{label}: accepted")
        except error:
            failures.check(True, "")


def main():
    torch.cuda.set_device(0)
    failures = Failures()
    with pycomm.Communicator() as comm:
        check_allreduce(comm, failures)
        check_broadcast(comm, failures)
        check_streams(comm, failures)
        check_refusals(comm, failures)
    torch.cuda.synchronize()
    failures.finish()


if __name__ == "__main__":
    main()
