"""Communicator.allreduce in one process (P=1): the API's fixed overhead plus one local copy.

pytest runs a single process, so no data crosses between ranks here: this measures argument
checking, the hand-off to the native core and the copy of x into out. It is not an allreduce
bandwidth; for that use `mpirun -n P python -m pycomm.bench`.
"""

import numpy as np
import pytest

import pycomm

SIZES = {"8B": 8, "16MiB": 16 << 20}


@pytest.fixture(scope="module")
def comm():
    with pycomm.Communicator() as c:
        assert c.size == 1, "bench/ measures P=1 only; run the MPI sweep with python -m pycomm.bench"
        yield c


@pytest.mark.parametrize("label", list(SIZES))
@pytest.mark.benchmark(group="allreduce P=1 (API overhead + local copy)")
def test_allreduce_p1_overhead(benchmark, comm, label):
    x = np.arange(SIZES[label] // 4, dtype=np.float32)
    out = np.empty_like(x)

    benchmark(comm.allreduce, x, op="sum", out=out)

    np.testing.assert_array_equal(out, x)
