"""The C++ package: examples/cpp finds the pip-installed pycomm with find_package(pycomm), builds
with CMake, and allreduces under mpirun."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import run_mpi

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cpp"
# The environment's bin: python, and the mpich wheel's mpicxx and mpirun.
ENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

# mpirun starts python (as run_mpi does for every launch), which becomes the example program.
EXEC = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


def _cmake_dir(cwd: Path) -> str:
    # Outside the checkout, as a user runs it; -W error: importing must not warn either.
    cli = [sys.executable, "-W", "error", "-m", "pycomm.cmake"]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the C++ example"
    build = tmp_path_factory.mktemp("cpp-example")
    # As in an activated environment: FindMPI finds the mpich wheel's mpicxx first on PATH.
    env = dict(os.environ, PATH=f"{ENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    configure = [cmake, "-S", str(EXAMPLE), "-B", str(build), f"-Dpycomm_DIR={_cmake_dir(build)}"]
    configured = subprocess.run(configure, capture_output=True, text=True, timeout=300, env=env)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    return build / "allreduce_example", configured.stdout


def test_cmake_dir_holds_the_package_and_header():
    import pycomm

    cmake_dir = Path(pycomm.get_cmake_dir())
    for name in ("pycommConfig.cmake", "pycommConfigVersion.cmake", "pycommTargets.cmake"):
        assert (cmake_dir / name).is_file(), name
    prefix = cmake_dir.parent.parent.parent
    assert (prefix / "include" / "pycomm" / "pycomm.h").is_file()
    assert (prefix / "lib" / "libpycomm_mpi.a").is_file()
    assert str(cmake_dir) == _cmake_dir(ROOT)  # the same from inside the checkout


def test_example_uses_the_mpi_pycomm_was_built_with(example):
    program, configure_output = example
    found = re.search(r"Found pycomm \S+ in .* \(built against (.+?); MPI here: (.+?) in ", configure_output)
    assert found, configure_output
    assert found.group(1) == found.group(2), found.group(0)
    ldd = shutil.which("ldd")
    if ldd and (ENV_BIN.parent / "lib" / "libmpi.so.12").exists():
        libs = subprocess.run([ldd, str(program)], capture_output=True, text=True, timeout=60, check=True).stdout
        libmpi = next(line for line in libs.splitlines() if "libmpi" in line)
        assert str((ENV_BIN.parent / "lib").resolve()) in libmpi, libs


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_example_allreduces_under_mpirun(example, nprocs):
    program, _ = example
    result = run_mpi(nprocs, "-c", EXEC, program, timeout=120)
    lines = re.findall(r"rank (\d+) of (\d+): allreduce sum and avg .*: (\d+) of (\d+) wrong", result.stdout)
    assert sorted(int(rank) for rank, _, _, _ in lines) == list(range(nprocs)), result.stdout
    for _, size, wrong, checked in lines:
        assert (int(size), int(wrong)) == (nprocs, 0) and int(checked) > 2 * (1 << 22), result.stdout
