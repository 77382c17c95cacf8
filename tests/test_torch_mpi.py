"""pycomm.torch (Horovod-style API) and the torch example, under mpirun."""

from pathlib import Path

import pytest
from launch import run_mpi

pytestmark = pytest.mark.mpi

EXAMPLE = Path(__file__).parent.parent / "examples" / "torch" / "train_digits.py"


# 25 MiB: one bucket; 0.0001 MiB: a bucket per parameter.
@pytest.mark.parametrize("nprocs, bucket_mb", [(1, 25.0), (2, 25.0), (4, 25.0), (2, 0.0001), (3, 0.0001)])
def test_torch_api(nprocs, bucket_mb):
    result = run_mpi(nprocs, "torch_api.py", bucket_mb, timeout=240)
    assert "0 failures" in result.stdout


@pytest.mark.parametrize("nprocs", [1, 2])
def test_torch_example(nprocs):
    result = run_mpi(nprocs, str(EXAMPLE), "--epochs", "5", timeout=240)
    # mpirun may join the ranks' lines: count the reports, not the lines.
    assert result.stdout.count("parameters identical on all ranks: True") == nprocs, result.stdout
    assert "identical on all ranks: False" not in result.stdout
