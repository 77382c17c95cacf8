"""Runs a worker script under `mpirun -n P`, bounded by a timeout, so a bug fails instead of hanging."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
DEFAULT_TIMEOUT_S = 120


def mpirun_path() -> str:
    # The mpich wheel installs mpirun next to the interpreter; prefer it over any other on PATH.
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


SHM = Path("/dev/shm")


def mpi_segments() -> set:
    """MPICH's shared-memory segments now in /dev/shm."""
    return {p.name for p in SHM.glob("mpich_shm_*")} if SHM.is_dir() else set()


def _unmapped(names: set) -> set:
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:
            continue
        names = {name for name in names if f"/dev/shm/{name}" not in text}
    return names


def remove_orphaned_mpi_segments(before: set) -> None:
    """MPICH unlinks its node's segment in MPI_Finalize, so a job whose ranks die (the fault tests
    kill some on purpose) leaves it in /dev/shm: removes those that appeared since `before` and
    that no live process still maps (another job's), waiting up to 2 s for killed ranks to go."""
    new = mpi_segments() - before
    for _ in range(20):
        for name in _unmapped(new):
            try:
                (SHM / name).unlink()
            except OSError:
                pass
            new.discard(name)
        if not new:
            return
        time.sleep(0.1)


def run_mpi(nprocs: int, worker: str, *args, timeout: float = DEFAULT_TIMEOUT_S, env=None, check=True, mpirun_args=()):
    """Runs tests/workers/<worker> (or `python -c args[0]` / `python -m args[0]` for worker "-c" /
    "-m") on `nprocs` ranks.

    With check=True a non-zero exit or a timeout fails the calling test, showing every rank's
    output (each line prefixed with its rank).
    """
    target = [worker] if worker in ("-c", "-m") else [str(WORKERS / worker)]
    argv = [sys.executable, *target, *map(str, args)]
    return run_mpi_program(nprocs, argv, timeout=timeout, env=env, check=check, mpi_args=mpirun_args)


def run_mpi_program(nprocs: int, argv, *, timeout: float = DEFAULT_TIMEOUT_S, env=None, check=True, mpi_args=()):
    """Runs any program (argv) on `nprocs` ranks under the same timeout and reporting as run_mpi.

    mpi_args go to mpirun before the program (e.g. ["-genv", "LD_PRELOAD", path]).
    """
    cmd = [mpirun_path(), "-n", str(nprocs), "-prepend-rank", *map(str, mpi_args), *map(str, argv)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    segments = mpi_segments()
    # A session of its own lets a timeout kill mpirun and every rank it started.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{output}") from None
    except BaseException:  # pytest itself interrupted (Ctrl-C, a time limit around it): no orphans
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        print(f"interrupted: {' '.join(cmd)}\n{output}", flush=True)
        raise
    finally:
        if proc.returncode is not None:
            remove_orphaned_mpi_segments(segments)
    result = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{output}")
    return result
