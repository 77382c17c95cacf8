"""Bad input on one rank, exit without close, several communicators, the order of closes at exit;
run under mpirun by the tests.

usage: lifecycle.py MODE
"""

import sys
import weakref

import numpy as np
from common import run_mode
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank


def bad_input_on_one_rank(failures):
    """Rank 0's bad calls raise before anything is sent, so the next good call still matches up."""
    comm = pycomm.Communicator(chunk_bytes=64)
    if RANK == 0:
        for bad in (
            lambda: comm.allreduce(np.zeros(10), out=np.zeros(11)),
            lambda: comm.allreduce(np.zeros(10, np.int8), op="avg"),
            lambda: comm.broadcast(np.zeros(10), root=P),
            lambda: comm.reduce_scatter(np.zeros(P * 2 + 1)) if P > 1 else comm.reduce_scatter(np.zeros(())),
        ):
            try:
                bad()
                failures.check(False, "bad input did not raise")
            except (TypeError, ValueError):
                failures.check(True, "")
    y = comm.allreduce(np.full(1000, RANK, np.int64))
    failures.check(bool(np.all(y == P * (P - 1) // 2)), f"good call after bad input: {y[:3]}")
    comm.close()


def exit_with_work_in_flight(failures):
    """Async work never waited and a communicator never closed: the interpreter still exits cleanly."""
    comm = pycomm.Communicator()
    x = np.ones(1 << 20, np.float32)
    comm.allreduce_async(x, out=x)
    failures.check(True, "")


def communicators_on_sub_communicators(failures):
    """A communicator per mpi4py sub-communicator (split, dup) beside one on the world."""
    world_comm = pycomm.Communicator()
    half = world.Split(RANK % 2, RANK)
    sub = pycomm.Communicator(half)
    dup = pycomm.Communicator(world.Dup())
    y = sub.allreduce(np.array([RANK], np.int64))
    failures.check(int(y[0]) == sum(r for r in range(P) if r % 2 == RANK % 2), f"split allreduce {y}")
    failures.check(sub.size == half.size and sub.rank == half.rank, "split size/rank")
    z = dup.allreduce(np.array([1.0]))
    w = world_comm.allreduce(np.array([2.0]))
    failures.check(z[0] == P and w[0] == 2 * P, f"dup {z} world {w}")
    # The application's own MPI traffic on the parent communicator is not disturbed by pycomm's.
    failures.check(world.allreduce(RANK) == P * (P - 1) // 2, "application MPI traffic")
    # Communicator.dup(): same ranks and settings, and its calls pair only among themselves:
    # rank 0 has one on world_comm in flight while the others first call on the twin.
    twin = pycomm.Communicator(timeout=60, algorithm="ring").dup()
    failures.check((twin.size, twin.rank, twin.timeout, twin.algorithm) == (P, RANK, 60, "ring"), f"dup: {twin}")
    a, b = np.full(3, RANK + 1.0), np.full(5, 10.0 * (RANK + 1))
    if RANK == 0:
        work = world_comm.allreduce_async(a)
        got_b = twin.allreduce(b)
        got_a = work.wait()
    else:
        got_b = twin.allreduce(b)
        got_a = world_comm.allreduce(a)
    want = P * (P + 1) / 2
    failures.check(np.all(got_a == want) and np.all(got_b == 10 * want), f"dup pairs apart: {got_a} {got_b}")
    for c in (world_comm, sub, dup, twin):
        c.close()


def no_deadline(failures):
    """An infinite (or absurdly long) timeout means no deadline, not an instant one."""
    import time

    for timeout in (float("inf"), 1e12):
        comm = pycomm.Communicator(timeout=timeout)
        if RANK == 1:
            time.sleep(0.3)
        y = comm.allreduce(np.ones(4))
        failures.check(bool(np.all(y == P)), f"timeout={timeout}: {y}")
        comm.close()


def mismatched_calls(failures):
    """Ranks that call with different counts or dtypes all get MismatchError naming both sides,
    instead of reducing each other's unrelated data (shared-memory algorithm)."""
    comm = pycomm.Communicator(algorithm="oneshot")
    n = 10 if RANK == 0 else 100000
    try:
        comm.allreduce(np.ones(n, np.float32))
        failures.check(False, "mismatched counts were not detected")
    except pycomm.MismatchError as error:
        text = str(error)
        ok = "rank 0 called allreduce(float32, 10, sum)" in text
        ok = ok and "rank 1 called allreduce(float32, 100000, sum)" in text
        failures.check(ok, f"message: {error}")
    # The communicator refuses further work rather than guessing where the peers are.
    try:
        comm.allreduce(np.ones(4))
        failures.check(False, "a communicator was usable after a mismatch")
    except pycomm.CommError as error:
        failures.check("unusable" in str(error), f"after mismatch: {error}")
    comm.close()
    comm = pycomm.Communicator(algorithm="oneshot")
    x = np.ones(8, np.float32 if RANK == 0 else np.int32)
    try:
        comm.allreduce(x)
        failures.check(False, "mismatched dtypes were not detected")
    except pycomm.MismatchError as error:
        failures.check("float32" in str(error) and "int32" in str(error), f"message: {error}")
    comm.close()
    # comm.empty with different sizes: a mismatch before any segment exists.
    comm = pycomm.Communicator()
    try:
        comm.empty(1000 if RANK == 0 else 100000, np.uint8)
        failures.check(P == 1, "comm.empty of different sizes was not detected")
    except pycomm.MismatchError as error:
        failures.check("empty(1000 bytes)" in str(error), f"message: {error}")
    comm.close()
    # Ranks configured with different algorithms: refused at creation on every rank, not one rank
    # reading stale data (or a MismatchError between calls that print alike).
    try:
        pycomm.Communicator(algorithm="oneshot" if RANK == 0 else "auto").close()
        failures.check(P == 1, "different algorithms were not refused")
    except ValueError as error:
        failures.check("algorithm: 'oneshot' on rank(s) 0; 'auto' on rank(s) 1" in str(error), f"message: {error}")
    # Different chunk sizes: the ring's messages would not match (MPI: message truncated).
    try:
        pycomm.Communicator(chunk_bytes=4096 if RANK == 0 else "64K").close()
        failures.check(P == 1, "different chunk sizes were not refused")
    except ValueError as error:
        failures.check("chunk_bytes: 4096 on rank(s) 0; 65536 on rank(s) 1" in str(error), f"message: {error}")
    # The other collectives' small calls take their one-shot too (auto): a different call, count or
    # root, or a count that sends one rank down another path, is a mismatch on every rank.
    cases = [
        ("kind", lambda c: c.allgather(np.ones(3)) if RANK == 0 else c.broadcast(np.ones(3)), "allgather(float64, 3)"),
        ("count", lambda c: c.allgather(np.ones(3 if RANK == 0 else 4)), "allgather(float64, 3)"),
        ("path", lambda c: c.allgather(np.ones(3 if RANK == 0 else 300_000)), "allgather(float64, 3)"),
        ("root", lambda c: c.broadcast(np.ones(4), root=RANK % 2), "broadcast(float64, 4, root 0)"),
        ("root, large", lambda c: c.broadcast(np.ones(100_000), root=RANK % 2), "broadcast(float64, 100000, root 0)"),
        ("bcast path", lambda c: c.broadcast(np.ones(3 if RANK == 0 else 100_000)), "broadcast(float64, 3, root 0)"),
        ("op", lambda c: c.reduce_scatter(np.ones(P), op="max" if RANK else "sum"), "reduce_scatter(float64, 1, sum)"),
        # An empty allreduce is a call like any other: it must meet its partners' calls.
        ("empty", lambda c: c.allreduce(np.ones(0 if RANK == 0 else 1)), "allreduce(float64, 0, sum)"),
        ("empty, op", lambda c: c.allreduce(np.ones(0), op="max" if RANK else "sum"), "allreduce(float64, 0, sum)"),
    ]
    for name, call, expected in cases:
        comm = pycomm.Communicator(timeout=20)
        try:
            call(comm)
            failures.check(False, f"{name}: mismatch not detected")
        except pycomm.MismatchError as error:
            text = str(error)
            failures.check(f"rank 0 called {expected}" in text, f"{name}: message: {text}")
        comm.close()
    # The same small calls on every rank still work.
    comm = pycomm.Communicator()
    failures.check(bool(np.all(comm.allgather(np.full(3, RANK)) == np.repeat(np.arange(P), 3))), "small allgather")
    failures.check(bool(np.all(comm.broadcast(np.full(4, RANK), root=P - 1) == P - 1)), "small broadcast")
    failures.check(bool(np.all(comm.reduce_scatter(np.ones(2 * P), op="sum") == P)), "small reduce_scatter")
    comm.close()


def mismatched_calls_over_the_transport(failures):
    """Calls that go over point-to-point messages (ring, chain, barrier) compare a header first:
    every rank raises the same MismatchError naming two ranks, their calls and the call number."""

    cases = [
        ("count", lambda c: c.allreduce(np.ones(10 + RANK, np.float32)), "allreduce(float32, 10, sum) #1"),
        ("op", lambda c: c.allreduce(np.ones(10), op="max" if RANK else "sum"), "allreduce(float64, 10, max) #1"),
        ("kind", lambda c: c.barrier() if RANK else c.allgather(np.ones(3)), "allgather(float64, 3) #1"),
        # A small allreduce goes through shared memory, a barrier maybe not: still a mismatch.
        ("path", lambda c: c.barrier() if RANK else c.allreduce(np.ones(3)), "allreduce(float64, 3, sum) #1"),
        ("root", lambda c: c.broadcast(np.ones(4), root=RANK % 2), "broadcast(float64, 4, root 1) #1"),
        (
            "reduce_scatter",
            lambda c: c.reduce_scatter(np.ones(P * (1 + RANK)), op="min"),
            "reduce_scatter(float64, 1, min) #1",
        ),
    ]
    for name, call, expected in cases:
        comm = pycomm.Communicator(algorithm="ring" if name != "path" else "auto", timeout=5 if name == "path" else 30)
        try:
            call(comm)
            failures.check(False, f"{name}: mismatch not detected")
        except pycomm.MismatchError as error:
            text = str(error)
            failures.check(expected in text and "rank 0 called" in text, f"{name}: message: {text}")
        comm.close()
    # The same calls on every rank still work, and the checks leave the results alone.
    comm = pycomm.Communicator(algorithm="ring")
    comm.barrier()
    failures.check(bool(np.all(comm.allreduce(np.ones(1000)) == P)), "matching calls after the checks")
    comm.close()


def injected_fault(failures):
    """PYCOMM_FAULT makes one rank exit or stall; every other rank raises PeerError (at once for a
    dead rank on this node, within the timeout for a stuck one), and the communicator then refuses
    work. Exits without MPI_Finalize: a peer is gone."""
    import os
    import time

    size_bytes, algorithm, timeout = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    comm = pycomm.Communicator(timeout=timeout, algorithm=algorithm)
    x = np.ones(size_bytes // 4, np.float32)
    start = time.monotonic()
    try:
        for _ in range(6):
            comm.allreduce(x)
        failures.check(False, "no PeerError")
    except pycomm.PeerError as error:
        elapsed = time.monotonic() - start
        print(f"rank {RANK}: PeerError after {elapsed:.2f} s: {error}", flush=True)
        if timeout > 100:  # only the death itself can have raised it
            failures.check(elapsed < 30, f"PeerError took {elapsed:.1f} s")
            failures.check("rank 1 (pid" in str(error) and "died" in str(error), f"message: {error}")
        else:
            failures.check(elapsed < 60, f"PeerError took {elapsed:.1f} s")
            # A stalled rank that wakes finds its peers gone: dead, or left after their error.
            timed_out = "timed out" in str(error) and "waiting for rank" in str(error)
            gone = "died" in str(error) or "has left the communicator" in str(error)
            failures.check(timed_out or gone, f"message: {error}")
        try:
            comm.allreduce(x)
            failures.check(False, "usable after PeerError")
        except pycomm.CommError as again:
            failures.check("unusable after an earlier error" in str(again), f"after: {again}")
    print(f"rank {RANK}: {failures.checked} checks, {len(failures.items)} failed", flush=True)
    for item in failures.items:
        print(f"FAIL rank {RANK}: {item}", flush=True)
    if sys.argv[5:] == ["exit-normally"]:
        sys.exit(1 if failures.items else 0)  # pycomm's atexit hook must not let MPI_Finalize hang
    os._exit(1 if failures.items else 0)


def peer_exits_mid_call(failures):
    """Rank 1 exits from another thread while every rank is inside 64 MiB allreduces (single-copy:
    reading each other's memory): the others raise PeerError saying it died, at once."""
    import os
    import threading
    import time

    comm = pycomm.Communicator(algorithm=sys.argv[2])
    x = np.ones(16 << 20, np.float32)
    y = comm.allreduce(x)
    failures.check(bool(np.all(y == P)), f"first call: {y[:3]}")
    if RANK == 1:
        threading.Timer(0.3, lambda: os._exit(3)).start()
    start = time.monotonic()
    try:
        for _ in range(2000):
            comm.allreduce(x, out=y)
        failures.check(False, "no PeerError")
    except pycomm.PeerError as error:
        elapsed = time.monotonic() - start
        print(f"rank {RANK}: PeerError after {elapsed:.2f} s: {error}", flush=True)
        # A survivor may notice another survivor's exit first (it names that rank then).
        failures.check(elapsed < 30 and "died" in str(error), f"message: {error}")
    print(f"rank {RANK}: {failures.checked} checks, {len(failures.items)} failed", flush=True)
    for item in failures.items:
        print(f"FAIL rank {RANK}: {item}", flush=True)
    time.sleep(1.0)  # so that the other survivors see rank 1 die, not this one
    os._exit(1 if failures.items else 0)


def peer_leaves(failures):
    """Rank 1 leaves before its third call while the others make it: it raises an exception that
    nobody catches (pycomm closes its communicators at exit, then MPI_Finalize waits), or closes
    its communicator and goes on with other work. The others raise PeerError naming it at once,
    not at their 600 s timeout."""
    import time

    how, size_bytes, algorithm = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    comm = pycomm.Communicator(timeout=600, algorithm=algorithm)
    x = np.ones(size_bytes // 4, np.float32)
    for _ in range(2):
        comm.allreduce(x)
    if RANK == 1:
        if how == "raise":
            raise RuntimeError("an error in rank 1's own code")
        comm.close()
        time.sleep(30)  # alive and busy elsewhere: only its leaving can tell the others
        return
    start = time.monotonic()
    try:
        comm.allreduce(x)
        failures.check(False, "no PeerError")
    except pycomm.PeerError as error:
        elapsed = time.monotonic() - start
        print(f"rank {RANK}: PeerError after {elapsed:.2f} s: {error}", flush=True)
        failures.check(elapsed < 20, f"PeerError took {elapsed:.1f} s")
        failures.check("rank 1 has left the communicator" in str(error), f"message: {error}")
    print(f"rank {RANK}: {failures.checked} checks, {len(failures.items)} failed", flush=True)
    for item in failures.items:
        print(f"FAIL rank {RANK}: {item}", flush=True)
    sys.exit(1 if failures.items else 0)  # no agreement with rank 1: pycomm's exit hook ends the job


def killed_in_a_large_allreduce(failures):
    """Loops over 64 MiB allreduces (shared buffers and plain arrays) until the test kills every rank."""
    comm = pycomm.Communicator()
    shared = comm.zeros(16 << 20, np.float32)
    plain = np.zeros(16 << 20, np.float32)
    print(f"rank {RANK}: running", flush=True)
    while True:
        comm.allreduce(shared, out=shared)
        comm.allreduce(plain)


# Kept until exit, so that pycomm's exit hook is what closes them.
left_open = []


def print_each_close():
    """Makes every close of a communicator print "rank R closes NAME", for the test to read."""
    close = pycomm.Communicator.close

    def printing_close(self):
        if not self._closed:
            print(f"rank {RANK} closes {self.name}", flush=True)
        close(self)

    pycomm.Communicator.close = printing_close


def exit_order(failures):
    """Communicators left open at exit are closed newest first, in the same order on every rank:
    closing one that ran device work meets the node's other ranks, and ranks that closed them in
    different orders would each wait out the timeout. Creation order is the same on every rank
    (creating one is collective). Dups and communicators over MPI duplicates alike."""
    print_each_close()
    for i in range(7):
        c = left_open[-1].dup() if i % 2 else pycomm.Communicator(world.Dup() if i else world)
        c.name = f"c{i}"
        left_open.append(c)
    # The registry of open communicators holds them weakly: one nobody holds still goes.
    dropped = weakref.ref(pycomm.Communicator())
    failures.check(dropped() is None, "an unreferenced communicator was kept")


def optimizer_dups(failures):
    """A DistributedOptimizer's own communicator (a dup) closes when the garbage collector takes
    the optimizer only where closing is local; one that ran device work (closing meets the node's
    other ranks) is kept for the exit hook, as is that of an optimizer still alive at exit, whose
    finalizer runs before the hook: the hook closes them newest first on every rank."""
    import gc

    import torch

    import pycomm.torch as pt

    print_each_close()
    comm = pycomm.Communicator()
    comm.name = "comm"
    left_open.append(comm)

    def optimizer(name, ran_on_device):
        opt = pt.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), comm=comm)
        opt._pycomm.name = name
        opt._pycomm._ran_on_device = ran_on_device  # stands for a device call: there is no GPU here
        return opt

    host_dup = weakref.ref(optimizer("host_dup", False)._pycomm)
    device_dup = weakref.ref(optimizer("device_dup", True)._pycomm)
    gc.collect()
    failures.check(host_dup() is None, "the dup of a collected optimizer stayed open")
    failures.check(device_dup() is not None and not device_dup()._closed, "a dup that ran device work was closed")
    left_open.append(optimizer("held_dup", True))
    newer = comm.dup()
    newer.name = "newer"
    left_open.append(newer)


def creation_without_a_rank(failures):
    """Rank 1 never creates the communicator: it sleeps ("stuck"), or makes another collective
    ("diverged": a dup against an allreduce). Creation is collective and MPI's own collectives
    wait forever: rank 0 gets PeerError within the time-out instead (so does rank 1's allreduce),
    and the job ends through MPI_Abort at exit."""
    import time

    how = sys.argv[2]
    comm = pycomm.Communicator(timeout=2) if how == "diverged" else None
    start = time.monotonic()
    try:
        if RANK == 1 and how == "stuck":
            time.sleep(30)
        elif RANK == 1:
            comm.allreduce(np.ones(4, np.float32))
        elif comm is None:
            pycomm.Communicator(timeout=2)
        else:
            comm.dup()
        failures.check(False, f"rank {RANK}: no error")
    except pycomm.PeerError as error:
        elapsed = time.monotonic() - start
        print(f"rank {RANK}: PeerError after {elapsed:.2f} s: {error}", flush=True)
        failures.check(elapsed < 20, f"rank {RANK}: PeerError only after {elapsed:.1f} s")
        failures.check(RANK == 1 or "creating a communicator" in str(error), f"message: {error}")
    for item in failures.items:
        print(f"FAIL rank {RANK}: {item}", flush=True)
    sys.exit(0)  # no agreement through MPI: pycomm's exit hook ends the job with MPI_Abort


def main():
    run_mode(
        {
            "bad-input": bad_input_on_one_rank,
            "exit-in-flight": exit_with_work_in_flight,
            "sub-communicators": communicators_on_sub_communicators,
            "no-deadline": no_deadline,
            "mismatch": mismatched_calls,
            "mismatch-transport": mismatched_calls_over_the_transport,
            "fault": injected_fault,
            "exit-mid-call": peer_exits_mid_call,
            "leave": peer_leaves,
            "killed": killed_in_a_large_allreduce,
            "exit-order": exit_order,
            "optimizer-dups": optimizer_dups,
            "creation-without-a-rank": creation_without_a_rank,
        }
    )


if __name__ == "__main__":
    main()
