"""Bad input on one rank, exiting with work in flight, communicators over sub-communicators."""

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_bad_input_on_one_rank_sends_nothing(nprocs):
    run_mpi(nprocs, "lifecycle.py", "bad-input")


@pytest.mark.parametrize("nprocs", [2, 3])
def test_exit_with_async_work_in_flight(nprocs):
    run_mpi(nprocs, "lifecycle.py", "exit-in-flight", timeout=60)


@pytest.mark.parametrize("nprocs", [2, 4])
def test_sub_communicators(nprocs):
    run_mpi(nprocs, "lifecycle.py", "sub-communicators")


def test_infinite_timeout_waits_for_a_late_rank():
    run_mpi(2, "lifecycle.py", "no-deadline", timeout=60)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_mismatched_calls_raise_on_every_rank(nprocs):
    run_mpi(nprocs, "lifecycle.py", "mismatch", timeout=60)
