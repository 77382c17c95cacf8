"""torch CUDA tensors seen only through DLPack at P = 1, 2 ranks sharing one GPU; skipped where no
GPU exists (tests/gpu_marks.py)."""

import importlib.util

import pytest
from gpu_marks import GPU_MPI_MARKS
from launch import run_mpi

pytestmark = GPU_MPI_MARKS


@pytest.mark.parametrize("nprocs", [1, 2])
def test_dlpack_only_torch_tensors(nprocs):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    run_mpi(nprocs, "gpu_dlpack.py", timeout=300)
