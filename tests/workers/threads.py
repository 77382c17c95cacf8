"""Collectives from several Python threads at once; run under mpirun by the tests.

usage: threads.py MODE

The rule these check (README, API): calls on different communicators may run at the same time
from any threads. Calls on one communicator from several threads are serialised (each runs whole,
never interleaved with another), and, as with MPI, every rank must issue them in the same order.
Calls issued in different orders on different ranks that differ in kind, count, dtype, op or root
raise MismatchError (or PeerError, within the timeout) on every rank, never a hang or a silently
wrong result; calls that differ only in their data are indistinguishable and pair up as issued.

Inside the threads nothing calls mpi4py's collectives (they would pair across threads): each
thread records digests of its results, compared across ranks after the threads have joined.
"""

import sys
import threading
import time

import numpy as np
from common import digest, make_input, matches, np_dtype, run_mode
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank


class ThreadChecks:
    """Failures and digests of one thread; merged into the rank's Failures after the join."""

    def __init__(self, name):
        self.name = name
        self.failures = []
        self.checked = 0
        self.digests = {}

    def check(self, ok, what):
        self.checked += 1
        if not ok:
            self.failures.append(f"{self.name}: {what}")

    def run(self, body, *args):
        try:
            body(*args)
        except Exception as error:
            self.check(False, f"{type(error).__name__}: {error}")


def merge(failures, threads_checks):
    for checks in threads_checks:
        failures.checked += checks.checked
        failures.items.extend(checks.failures)
    # Every rank's digests of the same results must agree.
    mine = {f"{c.name} {label}": d for c in threads_checks for label, d in c.digests.items()}
    everyone = world.allgather(mine)
    for label in sorted(set().union(*everyone)):
        failures.check(len({d.get(label) for d in everyone}) == 1, f"{label}: ranks differ")


def start_all(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- (a) one communicator per thread -----------------------------------------------------------

SIZES = (1, 7, 1000, 70_000, 300_000)  # around the one-shot/ring cut-over for 4-byte types
DTYPES = ("float32", "int32", "float64", "bfloat16", "uint8")
ITERATIONS = 12


def loop_collectives(comm, checks, iterations, seed):
    """allreduce (new, in place, async), reduce_scatter, allgather and broadcast, checked."""
    for i in range(iterations):
        name = DTYPES[(i + seed) % len(DTYPES)]
        dtype = np_dtype(name)
        n = SIZES[(i * 3 + seed) % len(SIZES)]
        op = ("sum", "max", "min")[i % 3]
        inputs = [make_input(q, n, dtype, op, seed=seed * 1000 + i) for q in range(P)]
        y = comm.allreduce(inputs[RANK], op=op)
        checks.check(matches(y, inputs, dtype, op), f"#{i} allreduce {name} {op} n={n}")
        checks.digests[f"#{i} allreduce"] = digest(y)
        x = inputs[RANK].copy()
        comm.allreduce_async(x, op=op, out=x).wait()
        checks.check(np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"#{i} async in place differs")
        rows = n // P
        block = comm.reduce_scatter(inputs[RANK][: rows * P], op=op)
        parts = [a[RANK * rows : (RANK + 1) * rows] for a in inputs]
        checks.check(matches(block, parts, dtype, op), f"#{i} reduce_scatter {name} {op} rows={rows}")
        gathered = comm.allgather(inputs[RANK][: n % 50])
        want = np.concatenate([a[: n % 50] for a in inputs])
        checks.check(np.array_equal(gathered.view(np.uint8), want.view(np.uint8)), f"#{i} allgather")
        root = i % P
        buf = inputs[RANK].copy()
        comm.broadcast(buf, root=root)
        checks.check(np.array_equal(buf.view(np.uint8), inputs[root].view(np.uint8)), f"#{i} broadcast root {root}")


def loop_shared(comm, checks, iterations, seed):
    """comm.empty buffers reduced in place (zero-copy above the one-shot range), async and not."""
    buf = comm.empty(300_000, np.float32)
    for i in range(iterations):
        inputs = [make_input(q, buf.size, buf.dtype, "sum", seed=seed * 1000 + i) for q in range(P)]
        buf[...] = inputs[RANK]
        if i % 2:
            comm.allreduce_async(buf, out=buf).wait()
        else:
            comm.allreduce(buf, out=buf)
        checks.check(matches(buf, inputs, buf.dtype, "sum"), f"#{i} shared allreduce")
        checks.digests[f"#{i} shared"] = digest(buf)


def separate_communicators(failures):
    """Three threads, each with its own communicator over a Dup of the world (different
    algorithms and chunk sizes), plus a fourth on shared buffers, all at the same time."""
    settings = [("auto", 1 << 20), ("ring", 4096), ("oneshot", 64), ("auto", 1 << 20)]
    comms = [pycomm.Communicator(world.Dup(), algorithm=a, chunk_bytes=c, timeout=60) for a, c in settings]
    checks = [ThreadChecks(f"thread {t}") for t in range(len(comms))]
    bodies = [loop_collectives] * 3 + [loop_shared]
    start_all([lambda t=t: checks[t].run(bodies[t], comms[t], checks[t], ITERATIONS, t) for t in range(len(comms))])
    for comm in comms:
        comm.close()
    merge(failures, checks)


# -- (b) one communicator, several threads, one global order -----------------------------------


def ordered_on_one_communicator(failures):
    """Two threads share one communicator. A schedule, the same on every rank, says which thread
    issues the next call; a condition variable makes each thread wait for its turn. Async calls
    give the turn away as soon as they are queued, so blocking calls of the other thread queue
    behind them while this thread waits for its results or checks them: calls of both threads
    are in flight at once, in the same order on every rank."""
    comm = pycomm.Communicator(chunk_bytes=4096, timeout=60)
    steps = 240
    rng = np.random.default_rng(5)  # the same schedule on every rank
    owner = rng.integers(0, 2, steps)
    kinds = rng.choice(["async", "async", "allreduce", "broadcast", "allgather", "barrier"], steps)
    sizes = rng.choice([1, 33, 5000, 100_000], steps)
    turn = [0]
    cond = threading.Condition()
    checks = [ThreadChecks(f"thread {t}") for t in range(2)]

    def wait_turn(k):
        with cond:
            cond.wait_for(lambda: turn[0] in (k, -1))
            if turn[0] == -1:
                raise RuntimeError("the other thread failed")

    def pass_turn():
        with cond:
            turn[0] += 1
            cond.notify_all()

    def body(t):
        c = checks[t]
        pending = []
        for k in range(steps):
            if owner[k] != t:
                continue
            n, kind = int(sizes[k]), kinds[k]
            inputs = [make_input(q, n, np.dtype(np.float32), "sum", seed=k) for q in range(P)]
            wait_turn(k)
            if kind == "async":
                out = np.empty(n, np.float32)
                work = comm.allreduce_async(inputs[RANK], out=out)
                pass_turn()
                pending.append((k, work, inputs))
            else:
                try:
                    if kind == "allreduce":
                        y = comm.allreduce(inputs[RANK])
                        c.check(matches(y, inputs, y.dtype, "sum"), f"step {k}: allreduce n={n}")
                        c.digests[f"step {k}"] = digest(y)
                    elif kind == "broadcast":
                        buf = inputs[RANK].copy()
                        comm.broadcast(buf, root=k % P)
                        c.check(np.array_equal(buf, inputs[k % P]), f"step {k}: broadcast")
                    elif kind == "allgather":
                        g = comm.allgather(inputs[RANK])
                        c.check(np.array_equal(g, np.concatenate(inputs)), f"step {k}: allgather")
                    else:
                        comm.barrier()
                finally:
                    pass_turn()
            # Results are waited for off-turn, while the other thread issues its calls.
            while len(pending) > (k % 3):
                j, work, inputs = pending.pop(0)
                y = work.wait()
                c.check(matches(y, inputs, y.dtype, "sum"), f"step {j}: async n={inputs[0].size}")
                c.digests[f"step {j}"] = digest(y)
        for j, work, inputs in pending:
            y = work.wait()
            c.check(matches(y, inputs, y.dtype, "sum"), f"step {j}: async n={inputs[0].size}")
            c.digests[f"step {j}"] = digest(y)

    def run(t):
        checks[t].run(body, t)
        # A thread that failed must not leave the other waiting for its turn forever.
        if checks[t].failures:
            with cond:
                turn[0] = -1
                cond.notify_all()

    start_all([lambda t=t: run(t) for t in range(2)])
    failures.check(sum(c.checked for c in checks) >= steps // 3, "too few checks ran")
    comm.close()
    merge(failures, checks)


def unordered_identical_async(failures):
    """Four threads issue allreduce_async of identical calls with no order at all, dropping most
    of the Works: any pairing gives the same result, and the communicator's own bookkeeping
    (which keeps dropped work's arrays alive) must survive the race (it once freed arrays that
    were still being written)."""
    sys.setswitchinterval(1e-6)
    comm = pycomm.Communicator(timeout=60)
    checks = [ThreadChecks(f"thread {t}") for t in range(4)]

    def body(c):
        for i in range(20_000 if P == 1 else 4000):
            work = comm.allreduce_async(np.ones(4))
            if i % 1000 == 0:
                y = work.wait()
                c.check(np.array_equal(y, np.full(4, float(P))), f"#{i}: {y}")

    start_all([lambda c=c: c.run(body, c) for c in checks])
    y = comm.allreduce(np.ones(3))
    failures.check(np.array_equal(y, np.full(3, float(P))), f"after the threads: {y}")
    comm.close()
    sys.setswitchinterval(0.005)
    merge(failures, checks)


# -- (b) one communicator, different orders on different ranks ----------------------------------

MISORDERED = {
    # name: (algorithm, call of thread A, call of thread B, expected error class of the first call)
    "counts (one-shot)": (
        "auto",
        lambda c: c.allreduce(np.ones(10, np.float32)),
        lambda c: c.allreduce(np.ones(1000, np.float32)),
        pycomm.MismatchError,
    ),
    "dtypes (ring)": (
        "ring",
        lambda c: c.allreduce(np.ones(100, np.float32)),
        lambda c: c.allreduce(np.ones(100, np.float64)),
        pycomm.MismatchError,
    ),
    "ops (one-shot)": (
        "oneshot",
        lambda c: c.allreduce(np.ones(100), op="sum"),
        lambda c: c.allreduce(np.ones(100), op="max"),
        pycomm.MismatchError,
    ),
    "kinds (allgather, broadcast)": (
        "auto",
        lambda c: c.allgather(np.ones(100)),
        lambda c: c.broadcast(np.ones(100), root=0),
        pycomm.MismatchError,
    ),
    "async large vs blocking (shared-memory agreement)": (
        "auto",
        lambda c: c.allreduce_async(np.ones(300_000, np.float32)),
        lambda c: c.allreduce(np.ones(400_000, np.float32)),
        pycomm.MismatchError,
    ),
    # The broadcast checks its call through the same shared-memory round as the one-shot.
    "one-shot allreduce vs broadcast": (
        "auto",
        lambda c: c.allreduce(np.ones(10)),
        lambda c: c.broadcast(np.ones(10), root=0),
        pycomm.MismatchError,
    ),
}


def misordered_on_one_communicator(failures):
    """Two threads on one communicator: even ranks issue A's call then B's, odd ranks B's then
    A's. Every call raises a CommError on every rank within the timeout: the first call of each
    rank MismatchError or PeerError, the second one the communicator's refusal. The first call
    counts as issued once it returns (an async one once it is queued: the other thread's call
    then queues behind it)."""
    timeout = 3.0
    for name, (algorithm, call_a, call_b, first_error) in MISORDERED.items():
        comm = pycomm.Communicator(algorithm=algorithm, timeout=timeout)
        outcomes = {}
        first_done = threading.Event()
        a_first = RANK % 2 == 0

        def issue(label, call, goes_first, outcomes=outcomes, comm=comm, first_done=first_done):
            if not goes_first:
                first_done.wait()
            try:
                result = call(comm)
                if goes_first:
                    first_done.set()
                if isinstance(result, pycomm.Work):
                    result.wait()
                outcomes[label] = None
            except Exception as error:
                outcomes[label] = error
            finally:
                first_done.set()

        start = time.monotonic()
        start_all([lambda c=call_a, f=a_first: issue("A", c, f), lambda c=call_b, f=not a_first: issue("B", c, f)])
        elapsed = time.monotonic() - start
        first, second = (outcomes["A"], outcomes["B"]) if a_first else (outcomes["B"], outcomes["A"])
        failures.check(isinstance(first, first_error), f"{name}: first call gave {first!r}")
        failures.check(
            isinstance(second, pycomm.CommError) and "unusable" in str(second), f"{name}: second call gave {second!r}"
        )
        failures.check(elapsed < 4 * timeout + 10, f"{name}: took {elapsed:.1f} s")
        comm.close()
        world.barrier()  # the next case starts together


def misordered_identical_calls(failures):
    """Calls that differ only in their data cannot be told apart: issued in different orders
    they pair up as issued (rank 0's first call with rank 1's first call), with no error."""
    comm = pycomm.Communicator(timeout=30)
    a, b = np.full(8, 1.0 + RANK), np.full(8, 100.0 * (1 + RANK))
    results = {}
    first_done = threading.Event()
    a_first = RANK % 2 == 0

    def issue(label, x, goes_first):
        if not goes_first:
            first_done.wait()
        results[label] = comm.allreduce(x)
        if goes_first:
            first_done.set()

    start_all([lambda: issue("a", a, a_first), lambda: issue("b", b, not a_first)])
    # Even ranks' a met odd ranks' b.
    first_call = sum(1.0 + q if q % 2 == 0 else 100.0 * (1 + q) for q in range(P))
    mine_first = results["a"] if a_first else results["b"]
    failures.check(np.array_equal(mine_first, np.full(8, first_call)), f"first pairing {mine_first}")
    comm.close()


def main():
    run_mode(
        {
            "separate": separate_communicators,
            "ordered": ordered_on_one_communicator,
            "unordered-identical": unordered_identical_async,
            "misordered": misordered_on_one_communicator,
            "misordered-identical": misordered_identical_calls,
        }
    )


if __name__ == "__main__":
    main()
