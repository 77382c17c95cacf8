"""Every collective at P = 1..4 ranks under mpirun, against a numpy reference."""

import os

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi

DTYPE_GROUPS = {
    "half": ["float16", "bfloat16"],
    "float": ["float32", "float64"],
    "byte": ["int8", "uint8"],
    "int": ["int32", "int64", "uint32", "uint64"],
}


@pytest.mark.parametrize("algorithm", ["ring", "oneshot", "singlecopy"])
@pytest.mark.parametrize("group", DTYPE_GROUPS)
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_allreduce_matrix(nprocs, group, algorithm):
    """dtypes x ops x sizes x chunk sizes, out of place, out= and in place; bitwise equal across
    ranks; with each algorithm forced."""
    run_mpi(nprocs, "collectives.py", "allreduce", *DTYPE_GROUPS[group], env={"PYCOMM_ALGO": algorithm})


@pytest.mark.parametrize("algorithm", ["auto", "ring", "oneshot", "singlecopy"])
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_reduce_scatter_allgather_broadcast_barrier(nprocs, algorithm):
    """Out of place, out= and NCCL's in-place forms, with each algorithm forced."""
    run_mpi(nprocs, "collectives.py", "others", env={"PYCOMM_ALGO": algorithm})


@pytest.mark.parametrize("nprocs", [2, 3])
def test_host_arrays_that_speak_only_dlpack(nprocs):
    """CPU arrays seen only through __dlpack__ / __dlpack_device__: every collective, as numpy's."""
    run_mpi(nprocs, "collectives.py", "dlpack")


@pytest.mark.parametrize("algorithm", ["auto", "ring", "oneshot", "singlecopy"])
@pytest.mark.parametrize("nprocs", [2, 4])
def test_back_to_back_and_async(nprocs, algorithm):
    """200 mixed calls back to back; async calls complete in issue order and can be waited in reverse."""
    run_mpi(nprocs, "collectives.py", "stress", env={"PYCOMM_ALGO": algorithm})


def _pycomm_segments() -> set:
    return {name for name in os.listdir("/dev/shm") if name.startswith("pycomm-")}


def test_no_shared_memory_left_behind():
    """The segment is unlinked as soon as every rank has mapped it: nothing is in /dev/shm even
    while the job runs, so a killed job cannot leave it behind. (Not killed here: MPICH's own
    segments would stay.)"""
    before = _pycomm_segments()
    code = (
        "import os, numpy as np, pycomm; c = pycomm.Communicator(); "
        "print(f\"segments={len([n for n in os.listdir('/dev/shm') if n.startswith('pycomm-')])}\"); "
        "c.allreduce(np.ones(10))"
    )
    result = run_mpi(3, "-c", code)
    assert result.stdout.count("segments=0") == 3, result.stdout
    assert _pycomm_segments() == before


@pytest.mark.slow
def test_more_than_2_31_elements():
    run_mpi(2, "collectives.py", "large", timeout=300)


def test_readme_example_prints_on_every_rank():
    code = "import pycomm, numpy as np; c = pycomm.Communicator(); print(c.allreduce(np.ones(10, np.float32)))"
    result = run_mpi(4, "-c", code)
    # mpirun may interleave the ranks' lines, so count the arrays rather than parse lines.
    assert result.stdout.count("[4. 4. 4. 4. 4. 4. 4. 4. 4. 4.]") == 4, result.stdout


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_shared_buffers(nprocs):
    """comm.empty arrays reduced in place (every dtype and op), and the cases that must fall back."""
    run_mpi(nprocs, "collectives.py", "shared", timeout=300)


def test_shared_buffers_copy_nothing():
    code = (
        "import numpy as np, pycomm; c = pycomm.Communicator(debug=True); a = c.empty(1 << 20, np.float32); "
        "a[:] = 1; c.allreduce(a, out=a); assert (a == 2).all()"
    )
    result = run_mpi(2, "-c", code)
    assert result.stdout.count("in place in a shared buffer: no copies") == 2, result.stdout


@pytest.mark.parametrize("nprocs", [2, 3])
def test_singlecopy_falls_back_to_the_ring_on_every_rank(nprocs):
    """One rank cannot read its peers' memory (PYCOMM_CMA=0 there, as where process_vm_readv is
    refused): the first call's probe fails on it, every rank takes the ring from then on, results
    stay right, nobody hangs."""
    result = run_mpi(nprocs, "collectives.py", "singlecopy-fallback", timeout=120)
    assert result.stdout.count("the ring runs instead") >= 2 * nprocs, result.stdout


def test_singlecopy_is_auto_above_the_one_shot():
    """Plain arrays above the one-shot's range read peers' memory directly."""
    code = (
        "import numpy as np, pycomm; c = pycomm.Communicator(debug=True); x = np.ones(1 << 20, np.float32); "
        "assert (c.allreduce(x) == 2).all()"
    )
    result = run_mpi(2, "-c", code)
    assert result.stdout.count("single-copy allreduce") == 2, result.stdout
