"""The benchmark CLI (python -m pycomm.bench): its table, JSON and exit status, under mpirun.
Timings are never asserted, only that every column is produced and every result checked."""

import json
import subprocess
import sys

import pytest
from launch import run_mpi

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


def test_single_rank_without_mpirun():
    cmd = [sys.executable, "-m", "pycomm.bench", "-b", "1K", "-e", "4K", "--no-floor", "--op", "avg", *QUICK]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# Wrong elements: 0 OK" in result.stdout
    assert "floor_busbw" not in result.stdout


@pytest.mark.parametrize(
    "bad", [["--also", "fastest"], ["--factor", "1"], ["-b", "1M", "-e", "1K"], ["--dtype", "int32", "--op", "avg"]]
)
def test_bad_options_exit_2_with_a_message(bad):
    result = subprocess.run([sys.executable, "-m", "pycomm.bench", *bad], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error" in result.stderr
