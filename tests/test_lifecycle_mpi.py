"""Bad input on one rank, exiting with work in flight, sub-communicators, mismatched calls, dead
and stuck peers (injected with PYCOMM_FAULT), what a job killed mid-call leaves behind, and the
order communicators close in at exit."""

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from launch import WORKERS, mpi_segments, mpirun_path, remove_orphaned_mpi_segments, run_mpi

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


# Checked through the shared arena, or with PYCOMM_SHM=0 by a header exchange over MPI.
@pytest.mark.parametrize("shm", ["1", "0"])
@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_mismatched_calls_over_the_transport(nprocs, shm):
    run_mpi(nprocs, "lifecycle.py", "mismatch-transport", timeout=90, env={"PYCOMM_SHM": shm})


# MPICH's hydra (the mpich wheel): a rank that exits keeps the others running only with
# -disable-auto-cleanup; a rank killed by a signal takes the whole job down at once, with or
# without it (see test_killed_job_leaves_no_shared_memory).
# A dead rank is noticed at once (its process is gone), so those cases run with a 600 s timeout
# that they must not need; a stuck rank is noticed at the timeout (1.5 s).
@pytest.mark.parametrize(
    "nprocs, action, size_bytes, algorithm",
    [
        (2, "exit", 4 << 20, "ring"),
        (3, "exit", 4 << 20, "ring"),
        (4, "exit", 4 << 20, "ring"),  # ranks 2 and 3 wait on live ranks, yet name rank 1
        (2, "exit", 1024, "auto"),  # one-shot through shared memory
        (4, "exit", 8 << 20, "auto"),  # single-copy
        (2, "stall", 1024, "auto"),
        (3, "stall", 4 << 20, "ring"),
        (2, "exit", 4 << 20, "singlecopy"),  # peers read each other's memory
        (4, "exit", 8 << 20, "singlecopy"),
        (2, "stall", 4 << 20, "singlecopy"),
    ],
)
def test_dead_or_stuck_peer_raises_peer_error(nprocs, action, size_bytes, algorithm):
    env = {"PYCOMM_FAULT": f"rank=1,call=3,action={action},seconds=4"}
    timeout = 600 if action == "exit" else 1.5
    result = run_mpi(
        nprocs, "lifecycle.py", "fault", size_bytes, algorithm, timeout,
        env=env, check=False, timeout=90, mpirun_args=("-disable-auto-cleanup",),
    )  # fmt: skip
    survivors = [r for r in range(nprocs) if r != 1]
    for r in survivors:
        assert f"rank {r}: PeerError after" in result.stdout, result.stdout
    if action == "exit":
        assert result.stdout.count(" died") >= len(survivors), result.stdout
    elif nprocs == 2:
        assert "waiting for rank 1" in result.stdout
    assert "FAIL" not in result.stdout, result.stdout
    assert "PYCOMM_FAULT: rank 1 at call #3" in result.stdout


# The hierarchical allreduce on 2 simulated nodes x 2 ranks: rank 1 dies or stalls while its node
# partner waits in a shared-memory round and ranks 2 and 3 wait on MPI between nodes.
# Call 1 too: the groups are built when the communicator is created, not by the first call,
# whose blocking MPI calls would wait forever for a rank that is gone.
@pytest.mark.parametrize("action, call", [("exit", 3), ("stall", 3), ("exit", 1)])
def test_dead_or_stuck_peer_in_the_hierarchical_allreduce(action, call):
    env = {"PYCOMM_FAULT": f"rank=1,call={call},action={action},seconds=4", "PYCOMM_RANKS_PER_NODE": "2"}
    env["MPIR_CVAR_NOLOCAL"] = "1"
    result = run_mpi(
        4, "lifecycle.py", "fault", 8 << 20, "hierarchical", 600 if action == "exit" else 1.5,
        env=env, check=False, timeout=90, mpirun_args=("-disable-auto-cleanup",),
    )  # fmt: skip
    for r in (0, 2, 3):
        assert f"rank {r}: PeerError after" in result.stdout, result.stdout
    if action == "stall":
        # Node 1 waits out the time-out agreeing with node 0 (rank 0 never gets there): its error
        # says so, and what else may be wrong.
        for r in (2, 3):
            line = next(line for line in result.stdout.splitlines() if f"rank {r}: PeerError after" in line)
            assert "agreeing on the call with the other nodes" in line and "another call" in line, line
    assert "FAIL" not in result.stdout, result.stdout


@pytest.mark.parametrize("nprocs", [2, 3])
def test_peer_exits_in_the_middle_of_a_single_copy_allreduce(nprocs):
    """Rank 1 exits at a random point inside 64 MiB single-copy allreduces, possibly while a peer
    reads its memory (process_vm_readv fails with ESRCH): PeerError on every survivor, no hang."""
    result = run_mpi(
        nprocs, "lifecycle.py", "exit-mid-call", "singlecopy",
        check=False, timeout=90, mpirun_args=("-disable-auto-cleanup",),
    )  # fmt: skip
    for r in range(nprocs):
        if r != 1:
            assert f"rank {r}: PeerError after" in result.stdout, result.stdout
    assert "rank 1 (pid" in result.stdout and "FAIL" not in result.stdout, result.stdout


# One-shot (1 KiB) and single-copy (8 MiB) wait in shared-memory rounds, where a rank that
# leaves says so; the ring's messages go over MPI, but its call first agrees in shared memory.
# The job then ends through MPI_Abort (rank 1 is alive, in MPI_Finalize or asleep).
@pytest.mark.parametrize("how", ["raise", "close"])
@pytest.mark.parametrize(
    "nprocs, size_bytes, algorithm", [(2, 1024, "auto"), (3, 8 << 20, "auto"), (3, 4 << 20, "ring")]
)
def test_peer_that_leaves_raises_peer_error_at_once(nprocs, size_bytes, algorithm, how):
    result = run_mpi(nprocs, "lifecycle.py", "leave", how, size_bytes, algorithm, check=False, timeout=90)
    for r in range(nprocs):
        if r != 1:
            assert f"rank {r}: PeerError after" in result.stdout, result.stdout
    assert "calling MPI_Abort instead of MPI_Finalize" in result.stdout, result.stdout
    assert "FAIL" not in result.stdout, result.stdout


def test_exit_after_a_dead_peer_does_not_hang():
    """MPICH's MPI_Finalize waits for every rank, dead ones included: after a PeerError, pycomm
    ends the job with MPI_Abort at exit instead, so mpirun returns (non-zero) at once."""
    result = run_mpi(
        3, "lifecycle.py", "fault", 4 << 20, "ring", 600, "exit-normally",
        env={"PYCOMM_FAULT": "rank=1,call=3,action=exit"}, check=False, timeout=60,
        mpirun_args=("-disable-auto-cleanup",),
    )  # fmt: skip
    assert result.returncode != 0
    assert "calling MPI_Abort instead of MPI_Finalize" in result.stdout, result.stdout
    assert "FAIL" not in result.stdout, result.stdout


@pytest.mark.parametrize("how", ["stuck", "diverged"])
def test_creation_without_a_rank_is_a_peer_error(how):
    """Creating a communicator (or a dup) while a rank is stuck or makes another call: PeerError
    within the time-out, not a hang in MPI's collectives, and mpirun returns."""
    result = run_mpi(2, "lifecycle.py", "creation-without-a-rank", how, check=False, timeout=60)
    assert result.returncode != 0
    assert "rank 0: PeerError after" in result.stdout, result.stdout
    assert "calling MPI_Abort instead of MPI_Finalize" in result.stdout, result.stdout
    assert "FAIL" not in result.stdout, result.stdout


def test_malformed_fault_spec_is_an_error():
    result = run_mpi(1, "-c", "import pycomm; pycomm.Communicator()", env={"PYCOMM_FAULT": "rank=1"}, check=False)
    assert result.returncode != 0 and "PYCOMM_FAULT" in result.stdout


def _segments():
    return {name for name in os.listdir("/dev/shm") if name.startswith("pycomm-")}


@pytest.mark.parametrize("nprocs", [2, 4])
def test_killed_job_leaves_no_shared_memory(nprocs):
    """Every rank SIGKILLed in the middle of 64 MiB allreduces: nothing is left in /dev/shm."""
    before, mpich_before = _segments(), mpi_segments()
    cmd = [mpirun_path(), "-n", str(nprocs), sys.executable, str(WORKERS / "lifecycle.py"), "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, deadline = "", time.monotonic() + 60
        # Every rank has made its shared buffer and is in the loop (lines may interleave).
        while output.count("running") < nprocs:
            assert time.monotonic() < deadline, f"the ranks did not start: {output}"
            if select.select([proc.stdout], [], [], 1.0)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096).decode()
                assert chunk, f"the job ended before it was killed: {output}"
                output += chunk
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for _ in range(50):  # the ranks die a moment after the signal
            if not subprocess.run(["pgrep", "-f", "lifecycle.py killed"], capture_output=True).stdout:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
        remove_orphaned_mpi_segments(mpich_before)  # MPICH's own, which SIGKILL leaves
    assert _segments() - before == set()


def test_killed_rank_ends_the_job():
    """A rank killed by a signal: hydra ends the job with a non-zero status, nothing hangs."""
    result = run_mpi(
        3, "lifecycle.py", "fault", 4 << 20, "ring", 600,
        env={"PYCOMM_FAULT": "rank=1,call=3,action=kill"}, check=False, timeout=90,
    )  # fmt: skip
    assert result.returncode != 0
    assert "PYCOMM_FAULT: rank 1 at call #3: kill" in result.stdout


def _closes(output: str, nprocs: int) -> list:
    """Each rank's closes, in order, as the workers' print_each_close prints them."""
    return [re.findall(rf"rank {r} closes (\w+)", output) for r in range(nprocs)]


@pytest.mark.parametrize("nprocs", [2, 3])
def test_exit_closes_communicators_newest_first_on_every_rank(nprocs):
    """Closing a communicator that ran device work meets the node's other ranks: at exit every
    rank must close them in the same order, or each waits out the timeout in crossed meetings."""
    result = run_mpi(nprocs, "lifecycle.py", "exit-order", timeout=60)
    newest_first = [f"c{i}" for i in reversed(range(7))]
    assert _closes(result.stdout, nprocs) == [newest_first] * nprocs, result.stdout


def test_optimizer_dups_that_ran_device_work_close_at_exit():
    """The optimizer's dup closes with the optimizer only where closing is local (no device work);
    otherwise at exit, with the others, newest first, on every rank alike."""
    pytest.importorskip("torch")
    result = run_mpi(2, "lifecycle.py", "optimizer-dups", timeout=60)
    expected = ["host_dup", "newer", "held_dup", "device_dup", "comm"]
    assert _closes(result.stdout, 2) == [expected] * 2, result.stdout
