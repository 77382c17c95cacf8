"""libpycomm_mpi.so preloaded into unchanged MPI programs: a C program (tests/preload) and an mpi4py
script (tests/workers/preload_mpi4py.py), each run with and without the interposer at P = 1..4.

Inputs are small integers (halves for floats), so MPICH and the engine must give the same bits;
each program also checks its results against values it computes itself and that every rank of a
communicator holds the same bits.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import WORKERS, mpirun_path, run_mpi_program

pytestmark = pytest.mark.mpi

HERE = Path(__file__).parent
# mpirun -prepend-rank puts "[rank] " before each line.
CASE = re.compile(r"^(?:\[\d+\] )?case (\S+) @(\d+) (\S+)(.*)$", re.M)
STATS = re.compile(r"stats rank (\d+) engine (\d+) passthrough (\d+)")


@pytest.fixture(scope="module")
def library():
    printed = subprocess.run(
        [sys.executable, "-m", "pycomm.preload"], capture_output=True, text=True, timeout=120, check=True
    )
    path = Path(printed.stdout.strip())
    assert path.is_absolute() and path.is_file() and path.name == "libpycomm_mpi.so", printed.stdout
    return str(path)


@pytest.fixture(scope="module")
def check_program(tmp_path_factory):
    # The mpicc of the MPI the tests launch with (the mpich wheel's, beside its mpirun).
    mpicc = Path(mpirun_path()).parent / "mpicc"
    mpicc = str(mpicc) if mpicc.exists() else shutil.which("mpicc")
    assert mpicc, "mpicc is needed to build the C test program"
    exe = tmp_path_factory.mktemp("preload") / "allreduce_check"
    source = HERE / "preload" / "allreduce_check.c"
    subprocess.run(
        [mpicc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(source), "-ldl"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return str(exe)


def preloaded(library):
    # -genv: the ranks get the library, mpirun itself does not. In tools/sanitize.sh's run the
    # sanitized library needs the sanitizer runtimes loaded first.
    runtimes = os.environ.get("PYCOMM_SANITIZER_PRELOAD")
    return ["-genv", "LD_PRELOAD", f"{runtimes} {library}" if runtimes else library]


def cases(output):
    found = CASE.findall(output)
    assert found, output
    bad = [c for c in found if c[3].strip()]
    assert not bad, f"wrong or rank-dependent results: {bad[:5]}\n{output[-3000:]}"
    return [c[:3] for c in found]


def stats(output, nprocs):
    found = {int(r): (int(e), int(p)) for r, e, p in STATS.findall(output)}
    assert sorted(found) == list(range(nprocs)), output[-3000:]
    return found


def pycomm_segments():
    return {name for name in os.listdir("/dev/shm") if name.startswith("pycomm-")}


def test_library_exports_only_the_interposed_calls(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    listed = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in listed.splitlines() if line.strip()}
    assert {"MPI_Allreduce", "MPI_Allreduce_c", "pycomm_preload_stats"} <= names
    # The engine's C++ symbols stay private: they must not bind to pycomm._core's in one process.
    assert not [n for n in names if n.startswith("_ZN6pycomm")], names


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_c_program_same_bits_as_mpi(nprocs, library, check_program):
    """Every supported datatype x op, sizes 0, 1, odd, pages and > 1 MiB, in place and not, on
    MPI_COMM_WORLD, a duplicate and two splits: the engine gives MPICH's bits, on every call."""
    mode = ["engine"] if nprocs <= 2 else ["engine", "quick"]  # oversubscribed MPICH is slow
    before = pycomm_segments()
    plain = run_mpi_program(nprocs, [check_program, *mode], timeout=300)
    ours = run_mpi_program(nprocs, [check_program, *mode], timeout=300, mpi_args=preloaded(library))
    assert cases(ours.stdout) == cases(plain.stdout)
    assert all(v == "no-preload" for v in re.findall(r"stats rank \d+ (no-preload)", plain.stdout))
    # Every MPI_Allreduce of the program ran on the engine (one per distinct case), on every rank.
    calls = len({name for name, _, _ in cases(ours.stdout)})
    assert set(stats(ours.stdout, nprocs).values()) == {(calls, 0)}
    assert pycomm_segments() <= before


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_c_program_pass_through(nprocs, library, check_program):
    """MPI_LAND, MPI_BAND, MPI_MAXLOC on MPI_2INT, a user-defined op, a derived datatype, MPI_SHORT
    and an intercommunicator go to MPI unchanged (same bits), each with a debug line saying why."""
    plain = run_mpi_program(nprocs, [check_program, "passthrough"], timeout=300)
    ours = run_mpi_program(
        nprocs, [check_program, "passthrough"], timeout=300, mpi_args=preloaded(library), env={"PYCOMM_DEBUG": "1"}
    )
    assert cases(ours.stdout) == cases(plain.stdout)
    calls = 6 + (nprocs >= 2)  # the intercommunicator needs two ranks
    assert set(stats(ours.stdout, nprocs).values()) == {(0, calls)}
    for reason in (
        "op MPI_LAND:",
        "op MPI_BAND:",
        "datatype MPI_2INT:",
        "op a user-defined op:",
        "datatype a derived datatype:",
        "datatype MPI_SHORT:",
    ):
        # mpirun may join the ranks' lines: count the reports, not the lines.
        assert ours.stdout.count("passes through to PMPI: " + reason) == nprocs, (reason, ours.stdout)
    if nprocs >= 2:
        assert ours.stdout.count("passes through to PMPI: an intercommunicator") == nprocs


def test_engines_close_at_comm_free_and_finalize(library, check_program):
    """The duplicate and the split are freed by the program (their engines close then); the world's
    and the reversed split's engines close at MPI_Finalize. Core switches with values the core does
    not know (it would keep its defaults without a word) are reported, and the defaults kept."""
    unknown = {"PYCOMM_SHM": "off", "PYCOMM_CMA": "no", "PYCOMM_KERNELS": "avx512"}
    ours = run_mpi_program(
        2,
        [check_program, "engine", "quick"],
        timeout=300,
        mpi_args=preloaded(library),
        env={"PYCOMM_DEBUG": "1", **unknown},
    )
    for name, value in unknown.items():
        assert f"pycomm preload: ignoring {name}={value} (cannot read it); using the default" in ours.stdout
    for rank in range(2):
        assert ours.stdout.count(f"r{rank} | preload: engine created for a communicator") == 4, ours.stdout[-3000:]
        assert ours.stdout.count(f"r{rank} | preload: a communicator was freed: closing its engine") == 2
        assert f"r{rank} | preload: MPI_Finalize: closing 2 engine(s)" in ours.stdout


def test_erroneous_calls_get_mpis_own_errors(library, check_program):
    """A null buffer or aliased send and receive buffers: MPI's error class through
    MPI_ERRORS_RETURN, as without the interposer (not a crash or a silent success)."""
    plain = run_mpi_program(2, [check_program, "erroneous"], timeout=120)
    ours = run_mpi_program(2, [check_program, "erroneous"], timeout=120, mpi_args=preloaded(library))
    errors = re.findall(r"erroneous ([\w-]+) class=(\d+)", plain.stdout)
    assert [name for name, _ in errors] == ["null-send", "null-recv", "aliased"], plain.stdout
    assert all(int(error_class) != 0 for _, error_class in errors), plain.stdout
    assert re.findall(r"erroneous ([\w-]+) class=(\d+)", ours.stdout) == errors, ours.stdout


@pytest.mark.parametrize("nprocs", [2, 3])
def test_engine_error_reaches_the_error_handler(nprocs, library, check_program):
    """Ranks that disagree on the count (erroneous MPI) get, through MPI_ERRORS_RETURN, an error of
    class MPI_ERR_OTHER whose MPI_Error_string is the engine's message, then carry on."""
    ours = run_mpi_program(
        nprocs, [check_program, "mismatch"], timeout=120, mpi_args=preloaded(library), env={"PYCOMM_TIMEOUT": "30"}
    )
    lines = re.findall(r"mismatch rc=(\w+) class=(\d+) other=(\d+) text=(.*)", ours.stdout)
    assert len(lines) == nprocs, ours.stdout
    for rc, error_class, other, text in lines:
        assert rc == "error" and error_class == other, ours.stdout
        assert "pycomm engine" in text and "ranks disagree" in text, text


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_mpi4py_same_bits_as_mpi(nprocs, library):
    """Comm.Allreduce (MPI_Allreduce_c) from mpi4py on COMM_WORLD, a Dup and a Split; pycomm's own
    Communicator works beside the interposer in the same process."""
    script = str(WORKERS / "preload_mpi4py.py")
    plain = run_mpi_program(nprocs, [sys.executable, script], timeout=300)
    ours = run_mpi_program(nprocs, [sys.executable, script, "--with-pycomm"], timeout=300, mpi_args=preloaded(library))
    ours_cases = cases(ours.stdout)
    assert [c for c in ours_cases if not c[0].startswith("pycomm/")] == cases(plain.stdout)
    assert any(c[0] == "pycomm/int64/sum" for c in ours_cases)
    counts = stats(ours.stdout, nprocs)
    assert len(set(counts.values())) == 1
    engine, passed = counts[0]
    assert engine >= len({name for name, _, _ in ours_cases if "/n=" in name}) and passed == 0
