"""Property-based fuzzing (hypothesis) of every collective under mpirun: random shapes, dtypes,
ops, algorithms, chunk sizes and output modes against the numpy reference, bitwise identical on
every rank. The design is in tests/workers/fuzz.py.

The examples are derandomized, the same on every run; PYCOMM_FUZZ_SEED=<int> draws others.
"""

import os
import re

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi

KINDS = ("allreduce", "allreduce_async", "reduce_scatter", "allgather", "broadcast", "shared")


@pytest.mark.parametrize("nprocs, examples", [(2, 150), (3, 120), (4, 60)])
def test_random_collectives_match_numpy(nprocs, examples):
    seed = os.environ.get("PYCOMM_FUZZ_SEED")
    result = run_mpi(nprocs, "fuzz.py", examples, *([seed] if seed else []), timeout=240)
    ran = re.search(r"fuzz: (\d+) examples at P=(\d+)", result.stdout)
    assert ran and int(ran.group(2)) == nprocs, result.stdout
    # A generator that drew nothing (or a leader that stopped early) must not pass.
    assert int(ran.group(1)) == examples, result.stdout
    calls = re.search(r"fuzz: calls: (.*)", result.stdout).group(1)
    for kind in KINDS:
        assert re.search(rf"\b{kind} [1-9]", calls), f"no {kind} call was drawn: {calls}"
