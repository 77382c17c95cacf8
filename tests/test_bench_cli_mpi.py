"""The benchmark CLI (python -m pycomm.bench): its table, JSON and exit status, under mpirun.
Timings are never asserted, only that every column is produced and every result checked."""

import json
import subprocess
import sys

import pytest
from gpu_marks import gpu_present
from launch import run_mpi

from pycomm import bench

pytestmark = pytest.mark.mpi

QUICK = ["--iters", "3", "--warmup", "1"]


def test_sweep_against_mpi_and_a_forced_algorithm(tmp_path):
    out = tmp_path / "rows.json"
    args = ["pycomm.bench", "-b", "8", "-e", "64K", "-f", "16", "--vs", "mpi", "--also", "ring", "--json", out, *QUICK]
    result = run_mpi(2, "-m", *args, timeout=120)
    assert "# Wrong elements: 0 OK" in result.stdout, result.stdout
    for column in ("mpi_time(us)", "ratio", "ring(us)", "vs_ring", "floor_busbw", "%floor"):
        assert column in result.stdout
    report = json.loads(out.read_text())
    sizes = [row["size"] for row in report["rows"]]
    assert sizes == [8, 128, 2048, 32768], sizes
    for row in report["rows"]:
        assert row["wrong"] == 0 and row["mpi_wrong"] == 0 and row["also"]["ring"]["wrong"] == 0
        assert row["ratio"] > 0 and row["also"]["ring"]["ratio"] > 0
        assert row["floor_busbw"] > 0 and row["memory_bw"] > 0
    assert report["metadata"]["P"] == 2 and report["metadata"]["also"] == ["ring"]


@pytest.mark.parametrize("collective", ["reduce_scatter", "allgather", "broadcast"])
@pytest.mark.parametrize("in_place", [False, True])
def test_other_collectives_against_mpi(tmp_path, collective, in_place):
    """--collective: nccl-tests' sizes (the larger buffer, in whole blocks per rank), every result
    checked, pycomm's and MPI's, out of place and in NCCL's in-place forms, beside a forced ring."""
    out = tmp_path / "rows.json"
    args = ["pycomm.bench", "--collective", collective, "-b", "8", "-e", "64K", "-f", "16", "--vs", "mpi"]
    args += ["--also", "ring"]
    args += ["--json", out, *QUICK] + (["--in-place"] if in_place else [])
    args += ["-r", "2"] if collective == "broadcast" else []
    result = run_mpi(3, "-m", *args, timeout=120)
    assert f"# pycomm {collective} benchmark: P=3" in result.stdout, result.stdout
    assert "# Wrong elements: 0 OK" in result.stdout, result.stdout
    report = json.loads(out.read_text())
    sizes = [row["size"] for row in report["rows"]]
    if collective == "broadcast":
        assert sizes == [8, 128, 2048, 32768] and report["metadata"]["root"] == 2
    else:  # whole blocks of float32 per rank: 8 B has fewer elements than ranks
        assert sizes == [120, 2040, 32760], sizes
    for row in report["rows"]:
        assert row["redop"] == ("sum" if collective == "reduce_scatter" else "none")
        assert row["wrong"] == 0 and row["mpi_wrong"] == 0 and row["also"]["ring"]["wrong"] == 0
        assert row["ratio"] > 0 and row["floor_busbw"] > 0
    assert report["metadata"]["collective"] == collective and report["metadata"]["in_place"] == (
        in_place or collective == "broadcast"
    )


def test_single_rank_without_mpirun():
    # nccl-tests' short options: -d float -o avg -n 3 -w 1
    cmd = [sys.executable, "-m", "pycomm.bench", "-b", "1K", "-e", "4K", "--no-floor", "-d", "float", "-o", "avg"]
    cmd += ["-n", "3", "-w", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# Wrong elements: 0 OK" in result.stdout and "dtype=float32 op=avg" in result.stdout
    assert "floor_busbw" not in result.stdout


def test_gpu_sweep_on_a_stand_in_gpu(tmp_path):
    """--device gpu's path through the sweep, on numpy arrays standing in for device arrays: each
    size filled by upload and checked by download, pycomm against MPI through host copies."""
    out = tmp_path / "rows.json"
    args = ["-b", "8", "-e", "64K", "-f", "16", "--device", "gpu", "--vs", "mpi", "--json", out, *QUICK]
    result = run_mpi(2, "bench_gpu_standin.py", *args, timeout=120)
    assert "# Wrong elements: 0 OK" in result.stdout, result.stdout
    assert "# device=gpu: stand-in arrays on host memory standing in for a GPU" in result.stdout
    assert "copies to the host, runs MPI_Allreduce and copies back" in result.stdout
    assert "floor_busbw" in result.stdout and "%floor" in result.stdout
    report = json.loads(out.read_text())
    assert [row["size"] for row in report["rows"]] == [8, 128, 2048, 32768]
    for row in report["rows"]:
        assert row["wrong"] == 0 and row["mpi_wrong"] == 0 and row["ratio"] > 0
        assert row["floor_busbw"] > 0 and row["memory_bw"] > 0
    assert report["metadata"]["device"] == "gpu" and report["metadata"]["gpu_library"] == "stand-in"
    line = next(line for line in result.stdout.splitlines() if "stand-in calls:" in line)
    counts = dict(item.split("=") for item in line.split("stand-in calls:")[1].split())
    # Per size at least: fills of pycomm's and MPI's inputs, and every staged MPI call, upload;
    # checks and staged MPI calls download; every timed loop ends with a synchronisation; the
    # floor is the stand-in GPU's copies (a touch and 3 timed per size, each FLOOR_DEVICE_COPIES
    # copies waited for once).
    assert int(counts["init"]) == 1
    assert int(counts["copy"]) == 4 * 4 * bench.FLOOR_DEVICE_COPIES
    assert int(counts["upload"]) >= 2 * 4 and int(counts["download"]) >= 2 * 4
    assert int(counts["synchronize"]) >= 2 * 4


@pytest.mark.parametrize(
    "collective, mpi_name", [("reduce_scatter", "MPI_Reduce_scatter_block"), ("allgather", "MPI_Allgather")]
)
def test_other_collectives_in_place_on_a_stand_in_gpu(tmp_path, collective, mpi_name):
    """--device gpu with --collective: in-place views of device arrays, filled and checked through
    host copies; MPI's call staged through the host into this rank's output."""
    out = tmp_path / "rows.json"
    args = ["--collective", collective, "--in-place", "-b", "8", "-e", "64K", "-f", "16", "--device", "gpu"]
    args += ["--vs", "mpi"]
    result = run_mpi(3, "bench_gpu_standin.py", *args, "--json", out, *QUICK, timeout=120)
    assert "# Wrong elements: 0 OK" in result.stdout, result.stdout
    assert f"copies to the host, runs {mpi_name} and copies back" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(row["wrong"] == 0 and row["mpi_wrong"] == 0 for row in rows), rows


def test_gpu_set_up_failing_on_one_rank_stops_every_rank():
    """One rank's GPU cannot be set up (an exclusive-process GPU, say): every rank exits 2 at once,
    none waits in the sweep's first collective for it."""
    env = {"STANDIN_FAILS_ON": "1"}
    result = run_mpi(2, "bench_gpu_standin.py", "--device", "gpu", "-e", "1K", env=env, timeout=60, check=False)
    assert result.returncode == 2, result.stdout
    assert "rank 1: RuntimeError: cudaErrorDevicesUnavailable (stand-in)" in result.stdout


@pytest.mark.parametrize(
    "bad",
    [
        ["--also", "fastest"],
        ["--factor", "1"],
        ["-b", "1M", "-e", "1K"],
        ["--dtype", "int32", "--op", "avg"],
        ["--device", "gpu", "--shared"],
        ["--device", "gpu", "--also", "ring"],
        ["--gpu-library", "torch"],
        ["--collective", "allgather", "--op", "max"],
        ["--collective", "allreduce", "--root", "0"],
        ["-c", "broadcast", "--root", "1"],  # one rank: no rank 1
        ["--collective", "alltoall"],
        ["-b", "1", "-e", "3"],  # no whole float32 in any size: an empty sweep is no success
        ["-b", "8", "-e", "8", "--json", "/nonexistent/folder/x.json"],  # refused before the sweep
    ],
)
def test_bad_options_exit_2_with_a_message(bad):
    result = subprocess.run([sys.executable, "-m", "pycomm.bench", *bad], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error" in result.stderr


def test_gpu_without_a_gpu_is_a_usage_error():
    """Where neither cupy nor torch sees a GPU (this machine), every rank says so and exits 2."""
    if gpu_present():
        pytest.skip("a GPU is present: tests/test_gpu_mpi.py runs the GPU sweep")
    result = run_mpi(2, "-m", "pycomm.bench", "--device", "gpu", "-e", "1K", timeout=120, check=False)
    assert result.returncode == 2, result.stdout
    assert "--device gpu needs cupy or torch with CUDA" in result.stdout  # stderr is merged into it
