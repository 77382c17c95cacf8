"""When the GPU tests can run: the one check they all share."""

import shutil
import subprocess

import pytest

from pycomm._native import _core


def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


# For mpirun-launched tests on device arrays: skipped where no GPU exists or pycomm has no CUDA.
GPU_MPI_MARKS = [
    pytest.mark.gpu,
    pytest.mark.mpi,
    pytest.mark.skipif(not gpu_present(), reason="no GPU on this machine"),
    pytest.mark.skipif(not _core.built_with_cuda(), reason="pycomm was built without CUDA (no nvcc at build time)"),
]
