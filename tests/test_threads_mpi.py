"""Collectives from several Python threads under mpirun: communicators used side by side, one
communicator shared in one global order, and the errors when the ranks' orders differ. The rule
they check is in README (API) and tests/workers/threads.py."""

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [2, 4])
def test_threads_on_separate_communicators(nprocs):
    """Three threads loop over allreduce/async/reduce_scatter/allgather/broadcast, each on its own
    communicator (auto, ring, one-shot), and a fourth on comm.empty buffers, all at once."""
    run_mpi(nprocs, "threads.py", "separate", timeout=180)


@pytest.mark.parametrize("nprocs", [2, 4])
def test_threads_share_one_communicator_in_one_order(nprocs):
    """Two threads, one communicator, async and blocking calls in a schedule shared by the ranks."""
    run_mpi(nprocs, "threads.py", "ordered", timeout=120)


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_threads_issue_identical_async_calls_without_order(nprocs):
    """Regression: threads racing in allreduce_async dropped each other's unfinished work (whose
    arrays were then freed while being written)."""
    run_mpi(nprocs, "threads.py", "unordered-identical", timeout=120)


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_threads_in_different_orders_raise_on_every_rank(nprocs):
    """Different orders on different ranks: MismatchError (or PeerError within the 3 s timeout),
    then refusal, on every rank; never a hang or a wrong result."""
    run_mpi(nprocs, "threads.py", "misordered", timeout=120)


@pytest.mark.parametrize("nprocs", [2, 4])
def test_threads_in_different_orders_with_identical_calls_pair_as_issued(nprocs):
    run_mpi(nprocs, "threads.py", "misordered-identical", timeout=60)
