"""Device arrays (torch, cupy) at P = 1, 2, 4 ranks sharing one GPU; skipped where no GPU exists."""

import importlib.util
import json

import pytest
from gpu_marks import GPU_MPI_MARKS
from launch import run_mpi

pytestmark = GPU_MPI_MARKS

# The tests that never ran on a GPU come first, the matrix that has (test_device_arrays) last:
# bench/gpu_check.sh gives the GPU tests whatever time is left, and a cut falls on the last.


# Simulated nodes on the one GPU (see tests/test_simulated_nodes_mpi.py): each node's leader does
# its node's part with CUDA IPC, and the leaders combine theirs through pinned host memory and the
# CPU ring. 2 nodes x 2 ranks, 4 nodes x 1 rank, uneven nodes of 3 + 1; and split work forced on
# 2 x 2 and 3 + 1 (every slice's owners cross together).
@pytest.mark.parametrize(
    "library, per_node, work",
    [
        ("torch", "2", "auto"),
        ("cupy", "1", "auto"),
        ("torch", "3", "auto"),
        ("cupy", "2", "split"),
        ("torch", "3", "split"),
    ],
)
def test_device_arrays_across_simulated_nodes(library, per_node, work):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    env = {"PYCOMM_RANKS_PER_NODE": per_node, "MPIR_CVAR_NOLOCAL": "1", "PYCOMM_GPU_WORK": work}
    run_mpi(4, "gpu.py", library, timeout=600, env=env)


@pytest.mark.parametrize("nprocs", [2, 4])
def test_split_work_on_one_gpu(nprocs):
    """PYCOMM_GPU_WORK=split, which auto picks where each rank has a GPU of its own: each rank
    reduces its slice of every input into every output. Forced here on the one GPU, to check the
    protocol and the slices on real CUDA IPC (slow on a shared GPU: stream waits switch contexts)."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    run_mpi(nprocs, "gpu.py", "cupy", timeout=600, env={"PYCOMM_GPU_WORK": "split"})


def test_without_cuda_ipc():
    """PYCOMM_GPU_IPC=off, the path taken where ranks cannot open each other's GPU memory: every
    rank goes through pinned host memory and the CPU ring."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    run_mpi(2, "gpu.py", "cupy", timeout=600, env={"PYCOMM_GPU_IPC": "off"})


def test_more_ranks_on_a_node_than_one_fused_pass_reads():
    """9 ranks on the GPU: the leader's reduction runs in several passes of at most 8 inputs."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    run_mpi(9, "gpu.py", "cupy", timeout=600)


@pytest.mark.parametrize("library, dtype", [("cupy", "float32"), ("torch", "bfloat16")])
def test_benchmark_cli_on_gpu_arrays(tmp_path, library, dtype):
    """python -m pycomm.bench --device gpu: every size checked on the GPU arrays, and (where MPI
    has the dtype) MPI through host copies beside it."""
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    out = tmp_path / "rows.json"
    args = ["pycomm.bench", "--device", "gpu", "--gpu-library", library, "--dtype", dtype, "-b", "8", "-e", "4M"]
    args += ["-f", "8", "--vs", "mpi", "--iters", "3", "--warmup", "1", "--json", out]
    result = run_mpi(2, "-m", *args, timeout=300)
    assert "# Wrong elements: 0 OK" in result.stdout, result.stdout
    report = json.loads(out.read_text())
    assert report["metadata"]["gpu_library"] == library and len(report["rows"]) == 7
    for row in report["rows"]:
        assert row["wrong"] == 0 and row["floor_busbw"] > 0
        assert dtype == "bfloat16" or (row["mpi_wrong"] == 0 and row["ratio"] > 0)


@pytest.mark.parametrize("sync", ["stream", "host"])
@pytest.mark.parametrize("library", ["torch", "cupy"])
@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_device_arrays(nprocs, library, sync):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    run_mpi(nprocs, "gpu.py", library, timeout=600, env={"PYCOMM_GPU_SYNC": sync})
