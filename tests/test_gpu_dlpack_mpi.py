"""torch CUDA tensors seen only through DLPack at P = 1, 2 ranks sharing one GPU; skipped where no
GPU exists (the same conditions as tests/test_gpu_mpi.py)."""

import importlib.util
import shutil
import subprocess

import pytest
from launch import run_mpi

from pycomm._native import _core


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.mpi,
    pytest.mark.skipif(not _gpu_present(), reason="no GPU on this machine"),
    pytest.mark.skipif(not _core.built_with_cuda(), reason="pycomm was built without CUDA (no nvcc at build time)"),
]


@pytest.mark.parametrize("nprocs", [1, 2])
def test_dlpack_only_torch_tensors(nprocs):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    run_mpi(nprocs, "gpu_dlpack.py", timeout=300)
