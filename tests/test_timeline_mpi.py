"""PYCOMM_TIMELINE: a Chrome trace of every rank's calls in one file (tests/workers/timeline.py)."""

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_timeline_of_every_rank(nprocs, tmp_path):
    path = tmp_path / "timeline.json"
    run_mpi(nprocs, "timeline.py", path, timeout=120, env={"PYCOMM_TIMELINE": str(path)})
