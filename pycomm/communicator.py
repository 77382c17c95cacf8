"""The Communicator: pycomm's collectives over the ranks of an MPI communicator."""

import atexit
import collections
import itertools
import sys
import threading
import time
import weakref

import numpy as np
from mpi4py import MPI

from . import device_arrays, settings
from ._native import _core
from .buffers import (
    as_input,
    check_in_place,
    check_no_partial_overlap,
    output_for,
    plain_tensor_view,
    read_only_hint,
)
from .dtypes import FLOATING_CODES, dtype_code, is_floating
from .errors import CommError, PeerError
from .ops import ReduceOp, parse_op
from .timeline import timeline_for

# The collectives a timeline records (PYCOMM_TIMELINE).
TRACED_CALLS = ("allreduce", "allreduce_async", "reduce_scatter", "allgather", "broadcast", "barrier")

# Communicators still open at interpreter exit are closed before mpi4py finalises MPI, newest
# first. Closing one that ran device work meets the node's other ranks, so every rank must close
# them in the same order; creating one is collective, so creation numbers order them alike on
# every rank. Held weakly, by creation number: one that nobody holds still goes.
_open_communicators = weakref.WeakValueDictionary()
_creation_numbers = itertools.count()
# Communicators whose owner has gone but whose close must wait for the exit hook (see
# Communicator._close_now_or_at_exit).
_kept_until_exit = []
# The creation barriers given up on (_arrive_together): MPI must not free them, and MPI_Finalize
# would wait for the rank that never came.
_abandoned_arrivals = []


@atexit.register
def _close_all() -> None:
    for _, comm in sorted(_open_communicators.items(), reverse=True):
        comm.close()
    _kept_until_exit.clear()
    if (_core.any_peer_failed() or _abandoned_arrivals) and MPI.Is_initialized() and not MPI.Is_finalized():
        # MPI_Finalize would wait forever for a dead or stuck rank: end the job instead, as a
        # failure, so that mpirun returns and reports it.
        sys.stderr.write("pycomm: a peer died or stopped answering; calling MPI_Abort instead of MPI_Finalize\n")
        sys.stderr.flush()
        time.sleep(0.2)  # lets mpirun forward the line before the abort takes the job down
        MPI.COMM_WORLD.Abort(1)


def _arrive_together(comm, timeout_s: float) -> None:
    """Creating a communicator is collective, and MPI's collectives wait forever: the ranks first
    meet in a barrier polled against the time-out, so that a rank that died, is stuck or made
    another call (its own collective, say) is a PeerError here instead of a hang in MPI."""
    if comm.Get_size() == 1:
        return
    arrival = comm.Ibarrier()
    deadline = time.monotonic() + timeout_s
    pause = 1e-5
    while not arrival.Test():
        if time.monotonic() > deadline:
            _abandoned_arrivals.append(arrival)
            raise PeerError(
                f"pycomm: creating a communicator: not every rank came within the time-out ({timeout_s:g} s); "
                "a rank died, is stuck, or made another call (creation is collective: every rank creates it)"
            )
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _agree_on_settings(comm, chosen: dict) -> None:
    """The settings that decide what ranks send each other must be alike on every rank (as with
    NCCL's environment). Compared once, at creation (collective): a difference is a ValueError
    on every rank, naming it, instead of a truncated message, a time-out or a MismatchError
    between calls that look alike in the first call."""
    said = comm.allgather(chosen)
    differ = []
    for name in chosen:
        ranks_of = collections.defaultdict(list)
        for rank, theirs in enumerate(said):
            ranks_of[theirs[name]].append(rank)
        if len(ranks_of) > 1:
            held = [f"{value!r} on rank(s) {', '.join(map(str, ranks[:8]))}" for value, ranks in ranks_of.items()]
            differ.append(f"{name}: {'; '.join(held)}")
    if differ:
        raise ValueError(f"pycomm: settings differ between ranks (set them alike everywhere): {' | '.join(differ)}")


class Work:
    """An asynchronous allreduce in flight. Keeps host arrays alive until it is done. Device work
    is queued on its stream at once (done from the start): as with any stream-ordered work (and
    NCCL), memory the stream has not reached yet must stay allocated, which the stream's own
    allocator ensures for arrays allocated on it."""

    def __init__(self, native_work, out: np.ndarray, keep_alive: tuple):
        self._native = native_work
        self._out = out
        self._keep_alive = keep_alive

    def wait(self):
        """Blocks until the operation has finished and returns its output array."""
        if self._native is not None:
            self._native.wait()
        self._keep_alive = ()
        return self._out

    def done(self) -> bool:
        """True once the operation has finished (for device arrays: once it is queued); never blocks."""
        return self._native is None or self._native.done()

    @property
    def seconds(self) -> float:
        """How long the operation ran once started (on the progress thread, or on the thread
        that waited for it); 0 until done."""
        return 0.0 if self._native is None else self._native.seconds()


class Communicator:
    """Collectives over every rank of an MPI intracommunicator (MPI.COMM_WORLD by default).

    Creating one is collective. All ranks must then call the same collectives in the same order
    with matching arguments. Works as a context manager; close() is idempotent.

    Keyword settings override the environment: `timeout` (PYCOMM_TIMEOUT, seconds),
    `chunk_bytes` (PYCOMM_CHUNK_BYTES), `algorithm` (PYCOMM_ALGO: auto, ring, oneshot,
    hierarchical, singlecopy), `inter_node` (PYCOMM_INTER_NODE: how the hierarchical allreduce
    crosses nodes: auto, mpi, ring), `debug` (PYCOMM_DEBUG), `timeline` (PYCOMM_TIMELINE: a
    path; every call of every rank goes there as a Chrome trace event, see pycomm/timeline.py).
    """

    def __init__(
        self, comm=None, *, timeout=None, chunk_bytes=None, algorithm=None, inter_node=None, debug=None, timeline=None
    ):
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"pycomm: expected an mpi4py intracommunicator, got {type(comm).__name__}")
        if comm == MPI.COMM_NULL:
            raise ValueError("pycomm: cannot build a communicator over MPI.COMM_NULL")
        chosen = (
            settings.chunk_bytes(chunk_bytes),
            settings.timeout(timeout),
            settings.debug(debug),
            settings.ALGORITHMS.index(settings.algorithm(algorithm)),
            settings.INTER_NODE.index(settings.inter_node(inter_node)),
        )
        settings.check_core_switches()
        _arrive_together(comm, chosen[1])
        _agree_on_settings(
            comm,
            dict(
                chunk_bytes=chosen[0],
                algorithm=settings.ALGORITHMS[chosen[3]],
                inter_node=settings.INTER_NODE[chosen[4]],
                PYCOMM_SHM=settings.shm_switch(),
            ),
        )
        timeline_of_calls = timeline_for(settings.timeline(timeline), comm)  # collective
        # mpi4py may hand out MPICH's int handles sign-extended; the core takes the 64 bits as they are.
        self._native = _core.Communicator(comm.handle & 0xFFFFFFFFFFFFFFFF, *chosen)
        self._closed = False
        # For dup(): the same MPI communicator and settings (the environment's still apply).
        self._mpi_comm = comm
        self._asked = dict(
            timeout=timeout,
            chunk_bytes=chunk_bytes,
            algorithm=algorithm,
            inter_node=inter_node,
            debug=debug,
            timeline=timeline,
        )
        # Async work holds its arrays until it has run, even if the caller drops the Work. The
        # lock keeps threads that issue calls at once from dropping each other's unfinished work.
        self._in_flight = collections.deque()
        self._in_flight_lock = threading.Lock()
        # Set before the first device call is issued: closing then meets the node's other ranks.
        self._ran_on_device = False
        self._creation_number = next(_creation_numbers)
        _open_communicators[self._creation_number] = self
        self._timeline = timeline_of_calls
        if self._timeline is not None:
            # Instance attributes shadow the methods: with no timeline, calls pay nothing.
            for name in TRACED_CALLS:
                setattr(self, name, self._timeline.traced(name, self))

    # -- introspection -------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._native.rank

    @property
    def size(self) -> int:
        return self._native.size

    @property
    def local_rank(self) -> int:
        """This rank's index among the ranks on its node."""
        return self._native.local_rank

    @property
    def local_size(self) -> int:
        """How many ranks of this communicator share this node."""
        return self._native.local_size

    @property
    def timeout(self) -> float:
        return self._native.timeout

    @property
    def chunk_bytes(self) -> int:
        return self._native.chunk_bytes

    @property
    def algorithm(self) -> str:
        return settings.ALGORITHMS[self._native.algorithm]

    @property
    def inter_node(self) -> str:
        return settings.INTER_NODE[self._native.inter_node]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"rank {self.rank} of {self.size}"
        return f"<pycomm.Communicator {state}>"

    # -- collectives ---------------------------------------------------------------------------

    def allreduce(self, x, op="sum", out=None, *, stream=None):
        """Reduces `x` elementwise over all ranks.

        Returns a new array of x's kind unless `out` is given; `out=x` reduces in place. Every
        rank gets bitwise identical results. For device arrays (torch, cupy) the work is queued on
        `stream` (default: the library's current stream) and the call returns without waiting
        for the GPU. As with NCCL, where `stream=` is not the stream x was made on, the caller
        orders it after whatever wrote x, and keeps cupy arrays alive until the work is done
        (torch tensors are recorded as in use on that stream, as torch.distributed does, so they
        may be dropped at once); only for an array whose __cuda_array_interface__ names another
        stream does the work wait for that stream (on the GPU), as the interface asks of its
        consumers.

        Arrays that speak only DLPack (__dlpack__, __dlpack_device__): on a CUDA device they are
        exported for `stream` (default: the legacy default stream), and need `out=` (pycomm cannot
        allocate one of them); in host memory they pass as numpy views, the result of an
        out-of-place call is a numpy array, and in place needs a writable view. The same holds
        for the other collectives.
        """
        # Fast path for plain numpy arrays with a known op: the native layer checks them and
        # says if anything is unusual, and the full checks below then run (and word the error).
        code = _fast_op_code(op)
        result = _plain_output(x, out, stream) if code is not None else None
        if result is not None and self._native.allreduce_if_plain(x, result, code):
            return result
        if stream is None and (out is x or out is None):
            if out is x and self._allreduce_device_in_place(x, op):
                return x
            result = self._allreduce_host_tensor(x, op, out)
            if result is not None:
                return result
        if _is_device(x):
            return self._allreduce_device(x, op, out, stream)
        self._check_host_stream(stream)
        xa, outa, code, op, result = self._prepare_allreduce(x, op, out)
        self._native.allreduce(xa, outa, xa.size, code, int(op))
        if out is not None:
            device_arrays.mark_host_written(out)
        return result

    def allreduce_async(self, x, op="sum", out=None, *, stream=None) -> Work:
        """Queues an allreduce for the communicator's progress thread and returns its Work
        (wait() runs it on the calling thread if the progress thread has not begun it).

        Operations complete in the order they were issued. Do not touch `x` or `out` until
        wait() returns. Device arrays are queued on `stream` at once, as with allreduce: the
        returned Work is already done, and the stream orders everything after it.
        """
        code = _fast_op_code(op)  # the fast path, as allreduce's
        result = _plain_output(x, out, stream) if code is not None else None
        if result is not None:
            native = self._native.allreduce_async_if_plain(x, result, code)
            if native is not None:
                return self._held_until_done(Work(native, result, (x, result)))
        if out is x and stream is None and self._allreduce_device_in_place(x, op):
            return Work(None, x, ())
        if _is_device(x):
            out = self._allreduce_device(x, op, out, stream)
            return Work(None, out, ())
        self._check_host_stream(stream)
        xa, outa, code, op, result = self._prepare_allreduce(x, op, out)
        native = self._native.allreduce_async(xa, outa, xa.size, code, int(op))
        work = self._held_until_done(Work(native, result, (x, xa, outa)))
        if out is not None:  # at issue, as torch.distributed's async ops; once the arrays are held
            device_arrays.mark_host_written(out)
        return work

    def _held_until_done(self, work: Work) -> Work:
        """Keeps `work` (and so its arrays) until it is done, even where the caller drops it."""
        # Work completes in issue order, so finished entries are always at the left.
        with self._in_flight_lock:
            while self._in_flight and self._in_flight[0].done():
                self._in_flight.popleft()
            self._in_flight.append(work)
        return work

    def reduce_scatter(self, x, op="sum", out=None, *, stream=None):
        """Reduces `x` over all ranks and returns this rank's block of rows.

        x.shape[0] must divide by the communicator size; the result has shape
        (x.shape[0] // size, *x.shape[1:]), a numpy array for a host DLPack-only x.
        """
        code = _fast_op_code(op)  # the fast path, as allreduce's
        if code is not None and type(x) is np.ndarray and x.ndim and x.shape[0] % self.size == 0:
            result = _plain_output(x, out, stream, (x.shape[0] // self.size,) + x.shape[1:])
            if result is not None and self._native.reduce_scatter_if_plain(x, result, code):
                return result
        self._check_open()
        if _is_device(x):
            d = device_arrays.describe(x, stream=stream)
            op = self._check_op(d.dtype, op)
            shape = self._reduce_scatter_shape(d.shape)
            on = device_arrays.stream_handle(d, stream)
            # In place (NCCL's form): out is this rank's block of x, which only this rank reads.
            o = self._device_output(d, out, shape, on, out_in_x_at=self._own_block_at(shape, d.dtype))
            code = dtype_code(d.dtype)
            self._before_work(stream, on, d, o)
            self._native.reduce_scatter_device(d.ptr, o.ptr, _count(shape), code, int(op), d.device, on)
            device_arrays.mark_written(o)
            return o.obj
        self._check_host_stream(stream)
        xa = as_input(x)
        op = self._check_op(xa.dtype, op)
        shape = self._reduce_scatter_shape(xa.shape)
        result, outa = output_for(x, xa, out, shape)
        # In place (NCCL's form): out is this rank's block of x, as on a GPU.
        check_no_partial_overlap(xa, outa, out_in_x_at=self._own_block_at(shape, xa.dtype))
        self._native.reduce_scatter(xa, outa, outa.size, dtype_code(xa.dtype), int(op))
        if out is not None:
            device_arrays.mark_host_written(out)
        return result

    def allgather(self, x, out=None, *, stream=None):
        """Concatenates every rank's `x` along axis 0, in rank order.

        The result has shape (size * x.shape[0], *x.shape[1:]), or (size,) for a 0-d x: the
        inverse of reduce_scatter's split, as with NCCL's allgather. A host DLPack-only x gives
        a numpy array.
        """
        if type(x) is np.ndarray:  # the fast path, as allreduce's
            result = _plain_output(x, out, stream, self._allgather_shape(x.shape))
            if result is not None and self._native.allgather_if_plain(x, result):
                return result
        self._check_open()
        if _is_device(x):
            d = device_arrays.describe(x, stream=stream)
            shape = self._allgather_shape(d.shape)
            on = device_arrays.stream_handle(d, stream)
            o = self._device_output(d, out, shape, on, x_in_out_at=self._own_block_at(d.shape, d.dtype))
            self._before_work(stream, on, d, o)
            self._native.allgather_device(d.ptr, o.ptr, _count(d.shape), dtype_code(d.dtype), d.device, on)
            device_arrays.mark_written(o)
            return o.obj
        self._check_host_stream(stream)
        xa = as_input(x)
        shape = self._allgather_shape(xa.shape)
        result, outa = output_for(x, xa, out, shape)
        check_no_partial_overlap(xa, outa, x_in_out_at=self._own_block_at(xa.shape, xa.dtype))
        self._native.allgather(xa, outa, xa.size, dtype_code(xa.dtype))
        if out is not None:
            device_arrays.mark_host_written(out)
        return result

    def broadcast(self, x, root: int = 0, *, stream=None):
        """Overwrites `x` on every rank with root's `x`, in place, and returns it."""
        if type(x) is np.ndarray and stream is None and type(root) is int and 0 <= root < self.size:
            if self._native.broadcast_if_plain(x, root):
                return x  # the fast path, as allreduce's
        self._check_open()
        self._check_root(root)
        if _is_device(x):
            d = device_arrays.describe(x, stream=stream)
            device_arrays.check_writable(d, "x")
            on = device_arrays.stream_handle(d, stream)
            self._before_work(stream, on, d)
            self._native.broadcast_device(d.ptr, _count(d.shape), dtype_code(d.dtype), int(root), d.device, on)
            device_arrays.mark_written(d)
            return x
        self._check_host_stream(stream)
        xa = as_input(x)
        if not xa.flags.writeable:
            raise ValueError(f"pycomm: broadcast writes into x, which is read-only{read_only_hint(x)}")
        self._native.broadcast(xa, xa.size, dtype_code(xa.dtype), int(root))
        device_arrays.mark_host_written(x)
        return x

    def dup(self) -> "Communicator":
        """A new communicator over the same ranks with the same settings (collective, as
        MPI_Comm_dup): its calls never pair with this one's, so a library can keep its traffic
        apart from its caller's. Close it when done."""
        self._check_open()
        return Communicator(self._mpi_comm, **self._asked)

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """A numpy array inside memory that every rank of this node maps (collective: every rank
        calls it with the same shape and dtype, in the same order).

        allreduce(buf, out=buf) on such arrays, at the same place on every rank, reduces straight
        from and into the peers' copies: nothing is copied in or out. Where the ranks do not all
        share a node this returns an ordinary array, and allreduce works on it as usual.
        """
        self._check_open()
        dtype = np.dtype(dtype)
        dtype_code(dtype)
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        count = _count(shape)
        raw = self._native.allocate_shared(count * dtype.itemsize) if count else None
        if raw is None:
            return np.empty(shape, dtype)
        return raw.view(dtype).reshape(shape)

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        """As empty(), filled with zeros."""
        array = self.empty(shape, dtype)
        array[...] = 0
        return array

    def barrier(self) -> None:
        """Returns once every rank has entered the barrier."""
        self._check_open()
        self._native.barrier()

    def close(self) -> None:
        """Finishes queued operations and releases the communicator's resources. Idempotent."""
        if not self._closed:
            self._closed = True
            _open_communicators.pop(self._creation_number, None)
            self._native.close()  # runs every queued operation first
            with self._in_flight_lock:
                self._in_flight.clear()

    def _close_now_or_at_exit(self) -> None:
        """For an owner done with this communicator at a moment that may differ between ranks (an
        optimizer the garbage collector takes): closes it now where closing is local, else keeps
        it open for the exit hook, which closes it in the same order on every rank. Closing after
        device work meets the node's other ranks: at different moments, each rank would wait out
        the timeout there and leak the GPU resources."""
        if self._ran_on_device:
            _kept_until_exit.append(self)
        else:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- helpers -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CommError("pycomm: the communicator is closed")

    def _check_op(self, dtype: np.dtype, op) -> ReduceOp:
        op = parse_op(op)
        if op is ReduceOp.AVG and not is_floating(dtype):
            raise ValueError(f"pycomm: avg is not defined for integer dtype {dtype}")
        return op

    def _check_root(self, root) -> None:
        if not isinstance(root, (int, np.integer)) or isinstance(root, bool):
            raise TypeError(f"pycomm: root must be an int, got {type(root).__name__}")
        if not 0 <= root < self.size:
            raise ValueError(f"pycomm: root {root} is not a rank of a size-{self.size} communicator")

    @staticmethod
    def _check_host_stream(stream) -> None:
        if stream is not None:
            raise ValueError("pycomm: stream= applies to device arrays only")

    def _reduce_scatter_shape(self, shape: tuple) -> tuple:
        if len(shape) == 0 or shape[0] % self.size:
            raise ValueError(
                f"pycomm: reduce_scatter needs x.shape[0] divisible by the size {self.size}, got shape {shape}"
            )
        return (shape[0] // self.size,) + tuple(shape[1:])

    def _allgather_shape(self, shape: tuple) -> tuple:
        return (self.size,) if len(shape) == 0 else (self.size * shape[0],) + tuple(shape[1:])

    def _own_block_at(self, block_shape, dtype) -> int:
        """Where this rank's block (of block_shape) starts in the whole of an allgather's output
        or a reduce_scatter's input, in bytes."""
        return self.rank * _count(block_shape) * dtype.itemsize

    def _device_output(self, d, out, shape, stream: int, x_in_out_at=None, out_in_x_at=None):
        """out, checked against x; they may overlap only in place (buffers.check_in_place)."""
        if out is None:
            return device_arrays.new_array(d, shape, stream)
        o = device_arrays.check_output(out, d, shape, stream=stream)
        if _overlap(d, o):
            check_in_place(d.ptr, o.ptr, x_in_out_at, out_in_x_at)
        elif d.device != o.device or d.device < 0:
            # The core checks x's GPU; out must be on the same one. Where an array does not say
            # its GPU (__cuda_array_interface__), the driver does.
            x_gpu = d.device if d.device >= 0 else self._native.device_of(d.ptr)
            out_gpu = o.device if o.device >= 0 else self._native.device_of(o.ptr)
            if x_gpu != out_gpu:
                raise ValueError(f"pycomm: out is on GPU {out_gpu}, x on GPU {x_gpu}")
        return o

    def _allreduce_device_in_place(self, x, op) -> bool:
        """Fast path for the commonest device call (a training loop's, a benchmark's): x in place
        on the library's current stream, with a known op. False, having sent nothing, for
        anything unusual (host arrays included): the full checks then run and word any error."""
        plain = device_arrays.plain_in_place(x)
        if plain is None or self._closed:
            return False
        code = _fast_op_code(op)
        library, ptr, count, dtype, device, on = plain
        if code is None or (code == ReduceOp.AVG and dtype not in FLOATING_CODES):
            return False
        self._ran_on_device = True
        self._native.allreduce_device(ptr, ptr, count, dtype, code, device, on)
        device_arrays.bump_version(library, x)
        return True

    def _allreduce_host_tensor(self, x, op, out):
        """Fast path for a torch CPU tensor with a known op, in place (out=x: a CPU training
        loop's call) or into a new tensor (pycomm.torch.allreduce, Horovod's form): numpy views
        take the numpy arrays' fast path. Returns the result, or None, having sent nothing, for
        anything unusual: the full checks then run and word any error."""
        view = plain_tensor_view(x)
        code = _fast_op_code(op)
        if view is None or code is None or self._closed:
            return None
        result = x if out is x else sys.modules["torch"].empty_like(x)
        if not self._native.allreduce_if_plain(view, view if out is x else result.numpy(), code):
            return None
        if out is x:
            device_arrays.bump_version("torch", x)
        return result

    def _allreduce_device(self, x, op, out, stream):
        self._check_open()
        d = device_arrays.describe(x, stream=stream)
        op = self._check_op(d.dtype, op)
        on = device_arrays.stream_handle(d, stream)
        # In place (out=x), the common case in training loops: x was just checked as the output too.
        if out is x:
            device_arrays.check_writable(d, "x")
        o = d if out is x else self._device_output(d, out, d.shape, on)
        self._before_work(stream, on, d, o)
        self._native.allreduce_device(d.ptr, o.ptr, _count(d.shape), dtype_code(d.dtype), int(op), d.device, on)
        device_arrays.mark_written(o)
        return o.obj

    def _before_work(self, asked, stream: int, d, o=None) -> None:
        """Once every check has passed, before the work on x (`d`) and out (`o`) is queued on
        `stream`. __cuda_array_interface__ leaves ordering to the consumer: where an array names
        a stream other than the work's, the work waits for that stream's queued work, on the
        GPU. Where the caller named the stream (`asked`, stream=), torch tensors are held for it
        (even should the call fail after queuing part of its work). The common case (no stream
        named anywhere) costs one comparison per array. From here on the communicator has run
        device work (its close meets the node's other ranks)."""
        self._ran_on_device = True
        arrays = (d,) if o is None or o is d else (d, o)
        for a in arrays:
            theirs = a.producer_stream  # only __cuda_array_interface__ arrays have one
            # No elements: nothing to order (nor a GPU to ask).
            if theirs not in (None, stream) and isinstance(theirs, int) and _count(a.shape):
                self._native.order_after_stream(a.ptr, stream, theirs)
        if asked is not None:
            device_arrays.hold_for_stream(stream, arrays)

    def _prepare_allreduce(self, x, op, out):
        self._check_open()
        xa = as_input(x)
        op = self._check_op(xa.dtype, op)
        result, outa = output_for(x, xa, out, xa.shape)
        check_no_partial_overlap(xa, outa)
        return xa, outa, dtype_code(xa.dtype), op, result


# Op names as the fast paths take them (other spellings take the full path).
_OP_CODES = {o.name.lower(): int(o) for o in ReduceOp}


def _plain_output(x, out, stream, shape=None):
    """For the fast paths: where x is a plain numpy array on no stream, `out` if it is one too, or
    a new array of `shape` (default x's) for a C-contiguous x (not for other views: a zero-stride
    view's shape may be far larger than its memory). None otherwise: the full path then checks
    the call."""
    if type(x) is not np.ndarray or stream is not None:
        return None
    if out is None:
        return np.empty(x.shape if shape is None else shape, x.dtype) if x.flags.c_contiguous else None
    return out if type(out) is np.ndarray else None


def _fast_op_code(op):
    """The native code of a lowercase op name or a ReduceOp, else None (the full path parses it)."""
    return _OP_CODES.get(op) if type(op) is str else int(op) if type(op) is ReduceOp else None


def _count(shape: tuple) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


def _overlap(a, b) -> bool:
    a_end = a.ptr + _count(a.shape) * a.dtype.itemsize
    b_end = b.ptr + _count(b.shape) * b.dtype.itemsize
    return a.ptr < b_end and b.ptr < a_end


def _is_device(x) -> bool:
    # numpy arrays, the common case, skip the device probe.
    return type(x) is not np.ndarray and device_arrays.is_device_array(x)
