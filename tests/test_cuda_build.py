"""The CUDA kernels compile wherever a CUDA compiler exists (no GPU needed), and pass their checks
where a GPU exists too."""

import shutil
import subprocess
from pathlib import Path

import pytest
from gpu_marks import gpu_present

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)

pytestmark = pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) on this machine")


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda-build")
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DPYCOMM_BUILD_PYTHON=OFF", "-DPYCOMM_CUDA=ON",
        "-DPYCOMM_BUILD_GPU_BENCH=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}",
    ]  # fmt: skip
    subprocess.run(configure, check=True, capture_output=True, timeout=300)
    built = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    return build


def test_cuda_kernels_compile_without_warnings(gpu_build):
    assert (gpu_build / "reduce_bench").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_present(), reason="no GPU on this machine")
def test_gpu_reduce_kernels_match_host_reference(gpu_build):
    bench = [str(gpu_build / "reduce_bench"), str(16 << 20)]
    result = subprocess.run(bench, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout
