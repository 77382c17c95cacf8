"""The build without CUDA (PYCOMM_CUDA=OFF, what `pip install .` gives on a machine with no CUDA
compiler): CI's machines have nvcc, so the usual build always has the CUDA parts, and only this
test shows that the CPU build still compiles, links nothing of CUDA, and refuses device arrays
with a clear error."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: the package, copied under another name (the installed pycomm,
# editable or not, cannot shadow it) with the CPU-only module.
CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import pycomm_cpu as pycomm
    from pycomm_cpu._native import _core

    assert not _core.built_with_cuda()

    class OnGpu:
        __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (1 << 40, False), "version": 3}

    with pycomm.Communicator() as comm:
        x = np.arange(4.0)
        assert (comm.allreduce(x) == x).all()
        y = OnGpu()
        try:
            comm.allreduce(y, out=y)
        except pycomm.CommError as error:
            assert "no CUDA support" in str(error), error
        else:
            raise AssertionError("a device array was taken by a build without CUDA")
        assert (comm.allreduce(x) == x).all()  # refused before anything was sent: still usable
    maps = open("/proc/self/maps").read()
    assert "libcudart" not in maps and "libcuda.so" not in maps, "CUDA libraries loaded"
    print("cpu-only ok")
    """
)


def test_module_builds_and_runs_without_cuda(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the module"
    import pybind11

    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DPYCOMM_CUDA=OFF", "-DPYCOMM_BUILD_PYTHON=ON"]
    configure += [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    configured = subprocess.run(configure, capture_output=True, text=True, timeout=300)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    assert "PYCOMM_CUDA:STRING=OFF" in (build / "CMakeCache.txt").read_text()
    built = subprocess.run(
        [cmake, "--build", str(build), "-j2", "--target", "_core"], capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stdout + built.stderr
    modules = list(build.glob("_core*.so"))
    assert len(modules) == 1, modules

    package = tmp_path / "pkg" / "pycomm_cpu"
    shutil.copytree(ROOT / "pycomm", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(modules[0], package)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_"))}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path / "pkg")], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0 and "cpu-only ok" in result.stdout, result.stdout + result.stderr
