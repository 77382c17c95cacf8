"""One machine standing for several nodes (PYCOMM_RANKS_PER_NODE, PYCOMM_NODE_ID): ranks of
different "nodes" share no memory and talk through MPI only. MPIR_CVAR_NOLOCAL=1 makes MPICH
itself treat every rank as remote, so the bytes between nodes leave shared memory for real."""

import sys

import pytest
from launch import WORKERS, run_mpi, run_mpi_program

from pycomm._native import _core

pytestmark = pytest.mark.mpi

NOLOCAL = {"MPIR_CVAR_NOLOCAL": "1"}

# (ranks, PYCOMM_RANKS_PER_NODE): 2 nodes x 2 ranks, 3 nodes x 1 rank, uneven nodes of 2 + 1.
LAYOUTS = [(4, "2"), (3, "1"), (3, "2")]


# auto is the hierarchical allreduce with MPI_Iallreduce across nodes (the ring for float16 and
# bfloat16); each inter-node leg forced; the flat ring.
ALGORITHMS = [("auto", "auto"), ("hierarchical", "mpi"), ("hierarchical", "ring"), ("ring", "auto")]


@pytest.mark.parametrize("nprocs, per_node", LAYOUTS)
@pytest.mark.parametrize("algorithm, inter_node", ALGORITHMS)
def test_allreduce_matrix_on_simulated_nodes(nprocs, per_node, algorithm, inter_node):
    env = {"PYCOMM_RANKS_PER_NODE": per_node, "PYCOMM_ALGO": algorithm, "PYCOMM_INTER_NODE": inter_node, **NOLOCAL}
    run_mpi(nprocs, "collectives.py", "allreduce", timeout=300, env=env)


@pytest.mark.parametrize("nprocs, per_node", LAYOUTS)
@pytest.mark.parametrize("mode", ["others", "stress", "shared", "back-to-back"])
def test_other_collectives_on_simulated_nodes(nprocs, per_node, mode):
    run_mpi(nprocs, "collectives.py", mode, timeout=300, env={"PYCOMM_RANKS_PER_NODE": per_node, **NOLOCAL})


@pytest.mark.parametrize("nprocs, per_node", [(4, "2"), (3, "2"), (3, "1")])
def test_mismatched_calls_across_nodes(nprocs, per_node):
    """The agreement through each node's arena and then between nodes: every rank raises the same
    MismatchError, naming the lowest ranks on both sides, whichever node they are on."""
    env = {"PYCOMM_RANKS_PER_NODE": per_node, **NOLOCAL}
    run_mpi(nprocs, "lifecycle.py", "mismatch-transport", timeout=120, env=env)


def test_ranks_that_cross_nodes_differently_disagree():
    """Slices crossing by MPI on some ranks and by pycomm's ring on another would never meet: a
    ValueError on every rank at creation, naming the setting, not a time-out."""
    result = run_mpi(4, "node_settings.py", "inter", timeout=120, env={"PYCOMM_RANKS_PER_NODE": "2", **NOLOCAL})
    said = "settings differ between ranks (set them alike everywhere): inter_node: 'mpi' on rank(s) 0, 1, 2; 'ring' on"
    for rank in range(4):
        assert f"rank {rank}: ValueError: pycomm: {said} rank(s) 3" in result.stdout, result.stdout


def test_different_chunk_sizes_fail_at_creation_on_every_rank():
    """Ring messages and the staging segment are sized from chunk_bytes: ranks that differ get a
    ValueError at creation saying so (not a truncated message or a time-out in the first call)."""
    result = run_mpi(4, "node_settings.py", "chunk", timeout=120, env={"PYCOMM_RANKS_PER_NODE": "2", **NOLOCAL})
    assert result.stdout.count("chunk_bytes: 4096 on rank(s) 0; 65536 on rank(s) 1, 2, 3") == 4, result.stdout


def test_hierarchical_on_uneven_nodes_of_three_and_two():
    """Nodes of 3 and 2 ranks: 3 slices, and local rank 0 of the small node owns two of them."""
    program = [sys.executable, str(WORKERS / "collectives.py"), "allreduce", "float32", "float16", "int64"]
    argv = ["-env", "PYCOMM_NODE_ID", "0", *program, ":", "-n", "2", "-env", "PYCOMM_NODE_ID", "1", *program]
    result = run_mpi_program(3, argv, timeout=300, env={"PYCOMM_DEBUG": "1", **NOLOCAL})
    assert result.stdout.count("hierarchy: 3 slices across nodes") == 5 * 3, result.stdout[-3000:]


def test_hierarchical_large_count_across_nodes():
    """2**31 + 3 int8 on nodes of 2 + 1 ranks: no offset or count of the pieces, slices and
    MPI calls may truncate."""
    env = {"PYCOMM_RANKS_PER_NODE": "2", "PYCOMM_ALGO": "hierarchical", "PYCOMM_INTER_NODE": "mpi", **NOLOCAL}
    run_mpi(3, "collectives.py", "large", timeout=300, env=env)


@pytest.mark.parametrize("nprocs, per_node", [(4, "2"), (3, "2")])
def test_random_collectives_on_simulated_nodes(nprocs, per_node):
    """The property-based fuzzer (tests/workers/fuzz.py) with ranks spread over simulated nodes."""
    result = run_mpi(nprocs, "fuzz.py", 40, timeout=240, env={"PYCOMM_RANKS_PER_NODE": per_node, **NOLOCAL})
    assert f"fuzz: 40 examples at P={nprocs}" in result.stdout, result.stdout[-2000:]


def test_nodes_without_shared_memory_fall_back_to_the_flat_ring():
    """PYCOMM_SHM=0: no node gets an arena, so every rank keeps the flat ring and the flat
    agreement, with the same results."""
    env = {"PYCOMM_RANKS_PER_NODE": "2", "PYCOMM_SHM": "0", "PYCOMM_DEBUG": "1", **NOLOCAL}
    result = run_mpi(4, "collectives.py", "stress", timeout=300, env=env)
    assert result.stdout.count("hierarchy unavailable: the ring runs instead") == 4, result.stdout[-2000:]


def test_training_across_simulated_nodes():
    """pycomm.train --check on 2 nodes x 2 ranks: gradients go through the hierarchical allreduce,
    parameters stay bitwise identical on every rank and match 1-rank training."""
    env = {"PYCOMM_RANKS_PER_NODE": "2", **NOLOCAL}
    result = run_mpi(4, "-m", "pycomm.train", "--check", "--steps", "20", timeout=300, env=env)
    assert "parameters bitwise identical on every rank" in result.stdout, result.stdout[-2000:]


def _layout_script():
    return (
        "import numpy as np, pycomm; c = pycomm.Communicator(); "
        "print(f'rank={c.rank} local={c.local_rank}/{c.local_size} "
        "sum={int(c.allreduce(np.ones(1000, np.int64))[0])}')"
    )


def test_ranks_per_node_groups_world_ranks():
    result = run_mpi(4, "-c", _layout_script(), env={"PYCOMM_RANKS_PER_NODE": "2", "PYCOMM_DEBUG": "1"})
    for rank in range(4):
        assert f"rank={rank} local={rank % 2}/2 sum=4" in result.stdout
    # Ranks of different nodes get no shared segment: the transport is MPI alone.
    assert result.stdout.count("created over mpi transport") == 4, result.stdout
    assert "mpi+shm" not in result.stdout


def test_node_id_per_process_mpmd():
    """mpirun's MPMD form sets PYCOMM_NODE_ID per process: ranks 0-2 on node 0, rank 3 on node 1."""
    program = [sys.executable, "-c", _layout_script()]
    argv = ["-env", "PYCOMM_NODE_ID", "0", *program, ":", "-n", "1", "-env", "PYCOMM_NODE_ID", "1", *program]
    result = run_mpi_program(3, argv, timeout=120)
    for rank, local in [(0, "0/3"), (1, "1/3"), (2, "2/3"), (3, "0/1")]:
        assert f"rank={rank} local={local} sum=4" in result.stdout, result.stdout


def test_bad_node_setting_fails_on_every_rank():
    result = run_mpi(2, "-c", _layout_script(), env={"PYCOMM_RANKS_PER_NODE": "0"}, check=False)
    assert result.returncode != 0
    assert "PYCOMM_RANKS_PER_NODE" in result.stdout


@pytest.mark.skipif(not _core.built_with_cuda(), reason="pycomm was built without CUDA (no nvcc at build time)")
@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"PYCOMM_GPU_INTER_NODE": "mpi"},
            "CommError: pycomm: PYCOMM_GPU_INTER_NODE=mpi, but this MPI does not report",
        ),
        (
            {"PYCOMM_GPU_INTER_NODE": "nvlink"},
            "ValueError: pycomm: PYCOMM_GPU_INTER_NODE must be auto, mpi or host, got",
        ),
        ({"PYCOMM_GPU_IPC": "no"}, "ValueError: pycomm: PYCOMM_GPU_IPC must be auto or off, got no"),
    ],
)
def test_device_arrays_across_nodes_refuse_bad_settings_on_every_rank(setting, message):
    """Device arrays across nodes need a CUDA-aware MPI when PYCOMM_GPU_INTER_NODE=mpi (this
    MPICH is not one); every rank fails alike before any GPU call or message, and an unknown
    setting is refused the same way."""
    env = {"PYCOMM_RANKS_PER_NODE": "2", **setting, **NOLOCAL}
    result = run_mpi(4, "node_settings.py", "device", timeout=120, env=env)
    assert result.stdout.count(message) == 4, result.stdout
