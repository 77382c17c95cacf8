"""The benchmark's expected results (pycomm.bench_collectives), without MPI: every rank's inputs
are built as the sweep fills them, the collective is done in numpy, and each rank's check must
find nothing wrong in the true result and something wrong in a shifted or misplaced one."""

import numpy as np
import pytest

from pycomm.bench import count_wrong, fill_periodic, input_tables
from pycomm.bench_collectives import COLLECTIVES
from pycomm.ops import ReduceOp

COUNT_PER_RANK = 37  # a block of 37: not a multiple of the period (7)


def ranks(name: str, P: int, dtype: np.dtype, op: ReduceOp):
    kind = COLLECTIVES[name]
    return [kind(P, r, dtype, input_tables(op, dtype, P, r) if kind.reduces else None, root=P - 1) for r in range(P)]


def filled_input(collective, count: int) -> np.ndarray:
    x = np.full(collective.counts(count)[0], 99, collective.dtype)  # 99: never an expected value
    for begin, end, table in collective.input_parts(count):
        fill_periodic(x[begin:end], table)
    return x


def numpy_results(name: str, inputs: list, op: ReduceOp) -> list:
    P = len(inputs)
    if name == "broadcast":
        return [inputs[P - 1].copy() for _ in range(P)]
    if name == "allgather":
        return [np.concatenate(inputs) for _ in range(P)]
    reduce = {ReduceOp.SUM: np.add, ReduceOp.MAX: np.maximum, ReduceOp.MIN: np.minimum, ReduceOp.PROD: np.multiply}
    total = inputs[0].copy()
    for x in inputs[1:]:
        total = reduce[op](total, x)
    if name == "allreduce":
        return [total] * P
    block = len(total) // P
    return [total[r * block : (r + 1) * block] for r in range(P)]


def wrong(collective, count: int, result: np.ndarray) -> int:
    return sum(count_wrong(result[begin:end], table) for begin, end, table in collective.result_parts(count))


@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.MAX, ReduceOp.PROD])
@pytest.mark.parametrize("dtype", [np.dtype(np.int8), np.dtype(np.float32)])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(COLLECTIVES))
def test_checks_pass_the_true_result_and_catch_misplaced_data(name, P, dtype, op):
    group = ranks(name, P, dtype, op)
    count = COUNT_PER_RANK * P
    results = numpy_results(name, [filled_input(c, count) for c in group], op)
    for collective, result in zip(group, results):
        assert len(result) == collective.counts(count)[1]
        assert wrong(collective, count, result) == 0
        assert wrong(collective, count, np.roll(result, 1)) > 0  # one element off
    if name == "allgather" and P > 1:
        for block in (4, 7, 32):  # whatever the block's length, a swap shows
            count_of = block * P
            results_of = numpy_results(name, [filled_input(c, count_of) for c in group], op)[0]
            swapped = np.concatenate([results_of[block : 2 * block], results_of[:block], results_of[2 * block :]])
            assert wrong(group[0], count_of, swapped) == 2 * block
        swapped = np.concatenate([results[0][COUNT_PER_RANK : 2 * COUNT_PER_RANK], results[0][:COUNT_PER_RANK]])
        swapped = np.concatenate([swapped, results[0][2 * COUNT_PER_RANK :]])
        assert wrong(group[0], count, swapped) > 0  # two ranks' blocks exchanged
    if name == "reduce_scatter" and P > 1:
        for block in (COUNT_PER_RANK, 7, 28):  # another rank's block shows, whatever the length
            results_of = numpy_results(name, [filled_input(c, block * P) for c in group], op)
            assert wrong(group[0], block * P, results_of[0]) == 0
            assert wrong(group[0], block * P, results_of[1]) > 0


@pytest.mark.parametrize("name", list(COLLECTIVES))
def test_in_place_views_are_nccls_forms(name):
    """In place, x and y lie in one buffer as pycomm (and NCCL) take them."""
    P, rank = 4, 2
    collective = COLLECTIVES[name](P, rank, np.dtype(np.float32), None)
    counts = collective.counts(8 * P)
    whole = np.zeros(max(counts), np.float32)
    x, y = collective.in_place(whole)
    assert (len(x), len(y)) == counts
    if name == "reduce_scatter":
        assert x is whole and y.ctypes.data == whole.ctypes.data + rank * 8 * 4
    elif name == "allgather":
        assert y is whole and x.ctypes.data == whole.ctypes.data + rank * 8 * 4
    else:
        assert x is whole and y is whole


def test_bus_factors_and_memory_traffic_follow_nccl_tests():
    P = 4
    factors = {name: kind(P, 0, np.dtype(np.float32)).bus_factor() for name, kind in COLLECTIVES.items()}
    assert factors == {"allreduce": 1.5, "reduce_scatter": 0.75, "allgather": 0.75, "broadcast": 1.0}
    traffic = {name: kind(P, 0, np.dtype(np.float32)).traffic() for name, kind in COLLECTIVES.items()}
    assert traffic == {"allreduce": 2.0, "reduce_scatter": 1.25, "allgather": 1.25, "broadcast": 1.0}
