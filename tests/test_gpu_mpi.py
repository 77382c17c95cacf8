"""Device arrays (torch, cupy) at P = 1, 2, 4 ranks sharing one GPU; skipped where no GPU exists."""

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


@pytest.mark.parametrize("sync", ["stream", "host"])
@pytest.mark.parametrize("library", ["torch", "cupy"])
@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_device_arrays(nprocs, library, sync):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed")
    run_mpi(nprocs, "gpu.py", library, timeout=600, env={"PYCOMM_GPU_SYNC": sync})
