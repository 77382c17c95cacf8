"""The collectives `python -m pycomm.bench --collective NAME` times, each as nccl-tests counts it
(all_reduce_perf, reduce_scatter_perf, all_gather_perf, broadcast_perf): which buffers a size
gives, its bus factor, what its result must be, and MPI's call for the same work.

A size is the larger buffer's (the reduce-scatter's input, the allgather's output), as in
nccl-tests; the other is 1/P of it. Expected values are periodic along the buffer (PERIOD) and
depend on the rank that contributed them, so a block at a wrong offset or from a wrong rank
shows as wrong elements; a reduce-scatter's blocks differ by where their period starts, which
moves on one element at each block, so that another rank's block shows whatever the blocks'
length (for P <= PERIOD). In place means NCCL's forms, those pycomm accepts: the
reduce-scatter's output is this rank's block of its input, the allgather's input this rank's
block of its output.
"""

import numpy as np
from mpi4py import MPI

# Inputs repeat with this period along the array. 7 is prime, so a block of data landing at a
# wrong offset (chunks and ring segments are mostly powers of two long) almost never matches.
PERIOD = 7


def rotated(table: np.ndarray, start: int) -> np.ndarray:
    """The table's period as seen from element `start` on."""
    return np.roll(table, -(start % PERIOD))


def owned_values(owner: int, start: int, dtype: np.dtype) -> np.ndarray:
    """One period of values for elements from `start` on that rank `owner` contributes, where no
    reduction applies (allgather, broadcast): the position mod PERIOD plus PERIOD times the owner
    (mod 18), so that a block from another rank is wrong in every element (ranks 18 apart aside),
    and at most 125: exact in every dtype."""
    return np.array([(start + k) % PERIOD + PERIOD * (owner % 18) for k in range(PERIOD)], dtype=dtype)


class Collective:
    """One collective's part in the sweep. `tables` = (this rank's input, the exact result) over
    one period, from bench.input_tables, for the collectives that reduce; None for the others."""

    name = ""
    mpi_name = ""
    reduces = True  # takes an op
    rooted = False
    in_place_only = False  # broadcast: its one buffer is input and output

    def __init__(self, size: int, rank: int, dtype: np.dtype, tables=None, root: int = 0):
        self.size, self.rank, self.dtype, self.tables, self.root = size, rank, dtype, tables, root

    def count_multiple(self) -> int:
        """Sizes are rounded down to a multiple of this many elements."""
        return 1

    def counts(self, count: int) -> tuple:
        """Elements of (x, y) for a size of `count` elements."""
        return count, count

    def bus_factor(self) -> float:
        raise NotImplementedError

    def traffic(self) -> float:
        """Bytes of memory each rank reads or writes per byte of the size, at best (every input
        read once, every output written once): the memory floor's measure."""
        raise NotImplementedError

    def in_place(self, whole):
        """(x, y) inside one buffer of the larger count."""
        return whole, whole

    def input_parts(self, count: int):
        """[(begin, end, table)]: how this rank fills x."""
        return [(0, self.counts(count)[0], self.tables[0])]

    def result_parts(self, count: int):
        """[(begin, end, table)]: what y must hold afterwards."""
        return [(0, self.counts(count)[1], self.tables[1])]

    def call(self, comm, x, y, op):
        raise NotImplementedError

    def mpi_call(self, world, send, recv, mpi_op) -> None:
        """MPI's collective from `send` (MPI.IN_PLACE: in place) into `recv`."""
        raise NotImplementedError

    def mpi_in_place_call(self, world, x, y, mpi_op) -> None:
        """MPI's in-place form on x and y as in_place gives them."""
        self.mpi_call(world, MPI.IN_PLACE, y, mpi_op)

    def mpi_in_place_result(self, x, y):
        """Where MPI's in-place form leaves the result."""
        return y

    def mpi_staged(self, world, host_x, out_count: int, mpi_op) -> np.ndarray:
        """MPI's collective on a host copy of x, as a program without pycomm (or a CUDA-aware
        MPI) runs it on device arrays: the result, to be copied into y."""
        if out_count == len(host_x):  # allreduce, broadcast, any at P = 1: in place on the copy
            self.mpi_call(world, MPI.IN_PLACE, host_x, mpi_op)
            return host_x
        result = np.empty(out_count, host_x.dtype)
        self.mpi_call(world, host_x, result, mpi_op)
        return result


class Allreduce(Collective):
    name, mpi_name = "allreduce", "MPI_Allreduce"

    def bus_factor(self) -> float:
        # A ring moves 2(P-1)/P of the data over each link; 0 at P=1.
        return 2.0 * (self.size - 1) / self.size

    def traffic(self) -> float:
        return 2.0

    def call(self, comm, x, y, op):
        comm.allreduce(x, op=op, out=y)

    def mpi_call(self, world, send, recv, mpi_op) -> None:
        world.Allreduce(send, recv, op=mpi_op)


class _BlockPerRank(Collective):
    """reduce_scatter and allgather: the size is cut into a block per rank, each rank moves
    (P-1)/P of the size over the links (nccl-tests' bus factor), and reads or writes 1 + 1/P of it
    in memory (its whole buffer and its own block)."""

    def count_multiple(self) -> int:
        return self.size

    def bus_factor(self) -> float:
        return (self.size - 1) / self.size

    def traffic(self) -> float:
        return 1.0 + 1.0 / self.size


class ReduceScatter(_BlockPerRank):
    name, mpi_name = "reduce_scatter", "MPI_Reduce_scatter_block"

    def counts(self, count: int) -> tuple:
        return count, count // self.size

    def in_place(self, whole):
        block = len(whole) // self.size
        return whole, whole[self.rank * block : (self.rank + 1) * block]

    def input_parts(self, count: int):
        block = count // self.size
        return [(q * block, (q + 1) * block, rotated(self.tables[0], self._phase(q, block))) for q in range(self.size)]

    def result_parts(self, count: int):
        block = count // self.size
        return [(0, block, rotated(self.tables[1], self._phase(self.rank, block)))]

    @staticmethod
    def _phase(q: int, block: int) -> int:
        """Where block q's period starts: one more than where it falls, so that blocks whose
        length is a multiple of PERIOD still differ."""
        return q * block + q

    def call(self, comm, x, y, op):
        comm.reduce_scatter(x, op=op, out=y)

    def mpi_call(self, world, send, recv, mpi_op) -> None:
        world.Reduce_scatter_block(send, recv, op=mpi_op)

    def mpi_in_place_call(self, world, x, y, mpi_op) -> None:
        self.mpi_call(world, MPI.IN_PLACE, x, mpi_op)

    def mpi_in_place_result(self, x, y):
        return x[: len(y)]  # MPI leaves it at the start of the input


class Allgather(_BlockPerRank):
    name, mpi_name = "allgather", "MPI_Allgather"
    reduces = False

    def counts(self, count: int) -> tuple:
        return count // self.size, count

    def in_place(self, whole):
        block = len(whole) // self.size
        return whole[self.rank * block : (self.rank + 1) * block], whole

    def input_parts(self, count: int):
        block = count // self.size
        return [(0, block, owned_values(self.rank, self.rank * block, self.dtype))]

    def result_parts(self, count: int):
        block = count // self.size
        return [(q * block, (q + 1) * block, owned_values(q, q * block, self.dtype)) for q in range(self.size)]

    def call(self, comm, x, y, op):
        comm.allgather(x, out=y)

    def mpi_call(self, world, send, recv, mpi_op) -> None:
        world.Allgather(send, recv)


class Broadcast(Collective):
    name, mpi_name = "broadcast", "MPI_Bcast"
    reduces = False
    rooted = True
    in_place_only = True

    def bus_factor(self) -> float:
        return 1.0

    def traffic(self) -> float:
        # The root's buffer read once, every other rank's written once.
        return 1.0

    def input_parts(self, count: int):
        # Other ranks start from the root's values one element on: different everywhere.
        return [(0, count, owned_values(self.root, 0 if self.rank == self.root else 1, self.dtype))]

    def result_parts(self, count: int):
        return [(0, count, owned_values(self.root, 0, self.dtype))]

    def call(self, comm, x, y, op):
        comm.broadcast(x, root=self.root)

    def mpi_call(self, world, send, recv, mpi_op) -> None:
        world.Bcast(recv, root=self.root)  # in place: send is MPI.IN_PLACE


COLLECTIVES = {c.name: c for c in (Allreduce, ReduceScatter, Allgather, Broadcast)}
