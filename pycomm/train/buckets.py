"""Gradient buckets: gradients packed into fused buffers, each averaged over the ranks by one
asynchronous allreduce that starts as soon as its last gradient is written (like DDP's buckets).

Parameters fill buckets in reverse order, the order backward produces their gradients. Buckets
start strictly in index order, whatever order their gradients arrive in, so every rank issues
the same allreduces in the same order.
"""

import time

import numpy as np

from ..bucketing import plan_buckets


class GradientBuckets:
    def __init__(self, comm, model, bucket_bytes: int, dtype, overlap: bool = True, device: bool = False):
        self.comm = comm
        self.overlap = overlap
        itemsize = np.dtype(dtype).itemsize
        self.members = members = plan_buckets([n * itemsize for n in model.sizes], bucket_bytes)
        self.buffers = []
        self._bucket_of = {}
        views = {}
        for b, params in enumerate(members):
            count = sum(model.sizes[i] for i in params)
            # In the node's shared segment, allreduce(out=buffer) copies nothing in or out.
            buffer = model.xp.empty(count, dtype) if device else comm.empty(count, dtype)
            self.buffers.append(buffer)
            offset = 0
            for i in params:
                views[i] = buffer[offset : offset + model.sizes[i]].reshape(model.shapes[i][1])
                self._bucket_of[i] = b
                offset += model.sizes[i]
        self.grads = [views[i] for i in range(len(model.sizes))]  # in parameter order
        self._reset()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def _reset(self) -> None:
        self._pending = [len(m) for m in self.members]
        self._next = 0
        self._works = []

    def grad(self, i: int):
        return self.grads[i]

    def ready(self, i: int) -> None:
        self._pending[self._bucket_of[i]] -= 1
        if self.overlap:
            self._start_ready()

    def _start_ready(self) -> None:
        while self._next < len(self.buffers) and self._pending[self._next] == 0:
            buffer = self.buffers[self._next]
            self._works.append(self.comm.allreduce_async(buffer, op="avg", out=buffer))
            self._next += 1

    def finish(self) -> tuple:
        """Waits until every bucket holds the average over ranks. Returns (seconds the allreduces
        ran, seconds this call waited for them): the difference was hidden behind backward."""
        missing = [i for b, m in enumerate(self.members) if self._pending[b] for i in m]
        if missing:
            raise RuntimeError(f"pycomm.train: backward left gradients {missing} unwritten")
        self._start_ready()
        start = time.perf_counter()
        for work in self._works:
            work.wait()
        waited = time.perf_counter() - start
        ran = sum(work.seconds for work in self._works)
        self._reset()
        return ran, waited


class LocalGradients:
    """The same interface over one private buffer with no communication: 1-rank reference training."""

    def __init__(self, model, dtype):
        self.buffer = model.xp.empty(model.count, dtype)
        self.grads = model.views(self.buffer)

    def grad(self, i: int):
        return self.grads[i]

    def ready(self, i: int) -> None:
        pass

    def finish(self) -> tuple:
        return 0.0, 0.0
