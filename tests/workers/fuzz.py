"""Property-based fuzzing of every collective against the numpy reference; run under mpirun.

usage: fuzz.py MAX_EXAMPLES [SEED]

Design: rank 0 alone runs hypothesis; every other rank follows it.

- Rank 0's @given test draws a case (a small dict: collective, dtype, op, shape, algorithm,
  inter-node leg, chunk size, output mode, broadcast root, input seed), broadcasts it with mpi4py and runs it like
  every other rank. The followers loop on that broadcast until rank 0 sends None. So every rank
  runs exactly the cases rank 0 drew, in the same order, whatever hypothesis does (generation,
  health checks, shrinking, the final replay of the minimal failing case) and however it decides
  with timing or randomness: nothing needs to be drawn identically on several ranks.
- Each case runs on a fresh pycomm.Communicator (its algorithm and chunk size are per communicator),
  closed afterwards, with a short timeout so that a lost peer is a PeerError rather than a hang.
- Inside a case no rank makes a world-wide mpi4py call: an exception on one rank must not leave the
  ranks at different MPI collectives. Each rank checks its results against the numpy reference
  (common.matches: exact for integers, min and max; within the rounding bound for float sums,
  products and averages) and records a digest of each result. After the case one gather brings
  every rank's failures and digests to rank 0, which also fails the case unless the digests are
  identical on every rank (bitwise identical results). Rank 0 raises inside the @given test on
  any failure, so hypothesis shrinks it (again by broadcasting cases) and prints the minimal
  falsifying case.
- derandomize=True by default, so CI runs the same examples every time; pass SEED to explore.
- The last lines report how many cases every rank ran (and per collective) so the test can check
  that the generator did not run vacuously.
"""

import collections
import math
import sys
import time
import traceback

import numpy as np
from common import ALL_DTYPES, OPS, digest, is_float, make_input, matches, np_dtype
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank
TIMEOUT_S = 20.0  # per wait on a peer: far above any legitimate wait here, far below the launch's
KINDS = ("allreduce", "allreduce_async", "reduce_scatter", "allgather", "broadcast", "shared")
ALGORITHMS = ("auto", "ring", "oneshot", "hierarchical", "singlecopy")
INTER_NODE = ("auto", "mpi", "ring")
# Auto's one-shot/single-copy cut-over is at 12 KiB (P=2) and 64 KiB (P>2), inside "small" for wide
# dtypes; its one-shot/ring cut-over where peers' memory is out of reach at 128 KiB and 512 KiB.
SIZE_CLASSES = {
    "tiny": (0, 16),  # elements: empty, one, fewer than ranks, not divisible by P
    "small": (17, 5000),
    "cut-over": (96 << 10, 640 << 10),  # bytes
    "large": (640 << 10, 3 << 20),  # bytes
}
MAX_CHUNKS = 256  # per block and ring step: bounds the pipeline's work at tiny chunk sizes


# -- the cases -------------------------------------------------------------------------------


@st.composite
def shapes(draw, itemsize: int, lead_multiple: int):
    """A shape: 0-d, 1-d or multi-dimensional, sized in one of SIZE_CLASSES; shape[0] is a
    multiple of `lead_multiple` (reduce_scatter's row split)."""
    size_class = draw(st.sampled_from(("0-d",) + tuple(SIZE_CLASSES)))
    if size_class == "0-d":
        if lead_multiple == 1:
            return ()
        size_class = "tiny"
    low, high = SIZE_CLASSES[size_class]
    n = draw(st.integers(low, high))
    if size_class in ("cut-over", "large"):
        n //= itemsize
    inner = tuple(draw(st.lists(st.integers(0, 9), max_size=2)))
    inner_count = math.prod(inner)
    rows = n // inner_count if inner_count else draw(st.integers(0, 4))
    rows -= rows % lead_multiple
    return (rows,) + inner


@st.composite
def calls(draw):
    """One collective call: what, on which dtype, op and shape, with which output."""
    kind = draw(st.sampled_from(KINDS))
    dtype_name = draw(st.sampled_from(ALL_DTYPES))
    dtype = np_dtype(dtype_name)
    op = draw(st.sampled_from([op for op in OPS if is_float(dtype) or op != "avg"]))
    modes = {
        "allreduce": ("new", "out", "inplace"),
        "allreduce_async": ("new", "out", "inplace"),
        "reduce_scatter": ("new", "out"),
        "allgather": ("new", "out"),
        "broadcast": ("inplace",),
        "shared": ("inplace", "async"),
    }[kind]
    return {
        "kind": kind,
        "dtype": dtype_name,
        "op": op,
        "shape": draw(shapes(dtype.itemsize, P if kind == "reduce_scatter" else 1)),
        "mode": draw(st.sampled_from(modes)),
        "root": draw(st.integers(0, P - 1)),
        "repeat": draw(st.integers(1, 3)) if kind == "allreduce_async" else 1,
        "seed": draw(st.integers(0, 2**16)),
    }


def nbytes(call) -> int:
    return math.prod(call["shape"]) * np_dtype(call["dtype"]).itemsize


@st.composite
def cases(draw):
    """A communicator (algorithm, chunk size) and the calls made on it, back to back."""
    sequence = draw(st.lists(calls(), min_size=1, max_size=4))
    # 8 bytes is the smallest chunk; on large arrays the smallest chunk keeps the work bounded.
    low = max(8, max(map(nbytes, sequence)) // P // MAX_CHUNKS)
    chunk = draw(st.one_of(st.integers(low, max(low, 4096)), st.integers(low, 1 << 20)))
    return {
        "algorithm": draw(st.sampled_from(ALGORITHMS)),
        "inter_node": draw(st.sampled_from(INTER_NODE)),
        "chunk_bytes": chunk,
        "calls": sequence,
    }


# -- running a case on every rank --------------------------------------------------------------


class Outcome:
    """One rank's findings for one case: failures, and digests of results that every rank must
    hold bitwise identical."""

    def __init__(self):
        self.failures = []
        self.digests = {}
        self.call = "setup"  # which call of the case is running

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(f"rank {RANK}, {self.call}: {what}")

    def same_everywhere(self, label: str, result: np.ndarray) -> None:
        self.digests[f"{self.call}: {label}"] = digest(result)


def inputs_for(call, seed_offset=0):
    dtype, shape = np_dtype(call["dtype"]), tuple(call["shape"])
    n = math.prod(shape)
    return [make_input(q, n, dtype, call["op"], seed=call["seed"] + seed_offset).reshape(shape) for q in range(P)]


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def reduced_ok(result, inputs, dtype, op) -> bool:
    return (
        result.shape == inputs[0].shape
        and result.dtype == dtype
        and matches(result.ravel(), [x.ravel() for x in inputs], dtype, op)
    )


def output_array(mode, x, shape=None):
    """(x to pass, out to pass) for an output mode."""
    if mode == "inplace":
        return x, x
    if mode == "out":
        return x, np.full(x.shape if shape is None else shape, 7, x.dtype)
    return x, None


def run_allreduce(comm, call, outcome):
    dtype, op, mode = np_dtype(call["dtype"]), call["op"], call["mode"]
    inputs = inputs_for(call)
    x, out = output_array(mode, inputs[RANK].copy())
    y = comm.allreduce(x, op=op, out=out)
    outcome.check(y is (out if out is not None else y) and (mode != "new" or y is not x), "wrong object returned")
    outcome.check(reduced_ok(y, inputs, dtype, op), f"result {y.ravel()[:4]}")
    if mode != "inplace":
        outcome.check(bits_equal(x, inputs[RANK]), "x was modified")
    outcome.same_everywhere("result", y)


def run_allreduce_async(comm, call, outcome):
    dtype, op, mode = np_dtype(call["dtype"]), call["op"], call["mode"]
    issued = []
    for i in range(call["repeat"]):
        inputs = inputs_for(call, seed_offset=i)
        x, out = output_array(mode, inputs[RANK].copy())
        issued.append((comm.allreduce_async(x, op=op, out=out), x, out, inputs))
    # Waited in reverse: completion is in issue order whatever the order of the waits.
    for i, (work, x, out, inputs) in reversed(list(enumerate(issued))):
        y = work.wait()
        outcome.check(work.done(), f"call {i}: not done after wait")
        outcome.check(out is None or y is out, f"call {i}: wrong object returned")
        outcome.check(reduced_ok(y, inputs, dtype, op), f"call {i}: result {y.ravel()[:4]}")
        if mode != "inplace":
            outcome.check(bits_equal(x, inputs[RANK]), f"call {i}: x was modified")
        outcome.same_everywhere(f"result {i}", y)


def run_reduce_scatter(comm, call, outcome):
    dtype, op, mode = np_dtype(call["dtype"]), call["op"], call["mode"]
    inputs = inputs_for(call)
    rows = inputs[0].shape[0] // P
    block_shape = (rows,) + inputs[0].shape[1:]
    x, out = output_array(mode, inputs[RANK].copy(), block_shape)
    y = comm.reduce_scatter(x, op=op, out=out)
    outcome.check(out is None or y is out, "wrong object returned")
    parts = [a[RANK * rows : (RANK + 1) * rows] for a in inputs]
    outcome.check(reduced_ok(y, parts, dtype, op), f"block {y.ravel()[:4]}")
    outcome.check(bits_equal(x, inputs[RANK]), "x was modified")


def run_allgather(comm, call, outcome):
    mode = call["mode"]
    inputs = inputs_for(call)
    want = np.stack(inputs) if inputs[0].ndim == 0 else np.concatenate(inputs)
    x, out = output_array(mode, inputs[RANK].copy(), want.shape)
    y = comm.allgather(x, out=out)
    outcome.check(out is None or y is out, "wrong object returned")
    outcome.check(bits_equal(y, want), f"gathered {y.ravel()[:4]}, want {want.ravel()[:4]}")
    outcome.check(bits_equal(x, inputs[RANK]), "x was modified")
    outcome.same_everywhere("result", y)


def run_broadcast(comm, call, outcome):
    root = call["root"]
    inputs = inputs_for(call)
    buf = inputs[RANK].copy()
    y = comm.broadcast(buf, root=root)
    outcome.check(y is buf, "wrong object returned")
    outcome.check(bits_equal(buf, inputs[root]), f"root {root}: {buf.ravel()[:4]}, want {inputs[root].ravel()[:4]}")
    outcome.same_everywhere("result", buf)


def run_shared(comm, call, outcome):
    """comm.empty buffers reduced in place: zero-copy above the one-shot range under auto."""
    dtype, op = np_dtype(call["dtype"]), call["op"]
    inputs = inputs_for(call)
    buf = comm.empty(inputs[0].shape, dtype)
    outcome.check(buf.shape == inputs[0].shape and buf.dtype == dtype, f"empty gave {buf.shape} {buf.dtype}")
    buf[...] = inputs[RANK]
    if call["mode"] == "async":
        y = comm.allreduce_async(buf, op=op, out=buf).wait()
    else:
        y = comm.allreduce(buf, op=op, out=buf)
    outcome.check(y is buf, "wrong object returned")
    outcome.check(reduced_ok(buf, inputs, dtype, op), f"result {buf.ravel()[:4]}")
    outcome.same_everywhere("result", buf)


RUNNERS = {
    "allreduce": run_allreduce,
    "allreduce_async": run_allreduce_async,
    "reduce_scatter": run_reduce_scatter,
    "allgather": run_allgather,
    "broadcast": run_broadcast,
    "shared": run_shared,
}


def execute(case) -> list:
    """Runs `case` on this rank; returns every rank's failures on rank 0 (None elsewhere)."""
    outcome = Outcome()
    try:
        comm = pycomm.Communicator(
            algorithm=case["algorithm"],
            inter_node=case["inter_node"],
            chunk_bytes=case["chunk_bytes"],
            timeout=TIMEOUT_S,
        )
        try:
            for i, call in enumerate(case["calls"]):
                outcome.call = f"call {i} ({call['kind']})"
                RUNNERS[call["kind"]](comm, call, outcome)
        finally:
            comm.close()
    except Exception as error:  # recorded: the other ranks must still reach the gather below
        outcome.check(False, f"{type(error).__name__}: {error}")
    gathered = world.gather((outcome.failures, outcome.digests), root=0)
    if RANK != 0:
        return None
    failures = [f for rank_failures, _ in gathered for f in rank_failures]
    labels = set().union(*(d for _, d in gathered))
    for label in sorted(labels):
        if len({d.get(label) for _, d in gathered}) != 1:
            failures.append(f"{label}: not bitwise identical on every rank")
    return failures


# -- driving: rank 0 leads, the others follow ---------------------------------------------------


def lead(max_examples: int, fixed_seed) -> bool:
    counts = collections.Counter()
    start = time.monotonic()

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=fixed_seed is None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        print_blob=False,
    )
    @given(cases())
    def collectives_match_numpy(case):
        counts["cases"] += 1
        counts[case["algorithm"]] += 1
        for call in case["calls"]:
            counts[call["kind"]] += 1
            counts[call["dtype"]] += 1
        world.bcast(case, root=0)
        failures = execute(case)
        if failures:
            message = f"case {case}:\n  " + "\n  ".join(failures)
            if not counts["failed"]:  # shown at once, in case the launch times out while shrinking
                print(f"fuzz: first failure: {message}", flush=True)
            counts["failed"] += 1
            raise AssertionError(message)

    if fixed_seed is not None:
        collectives_match_numpy = seed(fixed_seed)(collectives_match_numpy)
    try:
        collectives_match_numpy()
        ok = True
    except Exception:
        traceback.print_exc()
        ok = False
    world.bcast(None, root=0)
    total = counts["cases"]
    print(f"fuzz: {total} examples at P={P} in {time.monotonic() - start:.1f} s", flush=True)
    for what, keys in (("calls", KINDS), ("algorithms", ALGORITHMS), ("dtypes", ALL_DTYPES)):
        print(f"fuzz: {what}: " + ", ".join(f"{k} {counts[k]}" for k in keys), flush=True)
    ran = world.gather(total, root=0)
    if len(set(ran)) != 1:
        print(f"fuzz: the ranks ran different numbers of cases: {ran}", flush=True)
        return False
    return ok


def follow() -> bool:
    total = 0
    while (case := world.bcast(None, root=0)) is not None:
        execute(case)
        total += 1
    world.gather(total, root=0)
    return True


def main():
    max_examples = int(sys.argv[1])
    fixed_seed = int(sys.argv[2]) if len(sys.argv) > 2 else None
    ok = lead(max_examples, fixed_seed) if RANK == 0 else follow()
    # Rank 0's verdict for every rank, so that all exit alike.
    sys.exit(0 if world.bcast(ok, root=0) else 1)


if __name__ == "__main__":
    main()
