"""The timeline (PYCOMM_TIMELINE=path, or Communicator(timeline=path)): every collective call of
every rank as an event in one Chrome trace file, for chrome://tracing or https://ui.perfetto.dev,
as Horovod's HOROVOD_TIMELINE gives.

The file is in the trace format's JSON array form, whose closing bracket is optional: every rank
appends each event as it happens, one whole line per write (O_APPEND), so no rank waits for
another to write it, and the events of a rank that dies or is aborted mid-call stay readable.
Appends from several processes keep whole lines on a local file system, not on NFS: on several
nodes, give the file a node-local path (each node's then holds its ranks' events, and only the
node of world rank 0 starts it). Each rank is a process of the trace (pid: its rank in
MPI.COMM_WORLD), each calling thread a thread. Times are microseconds from the creation of the
process's first communicator with a timeline, which ends with the ranks meeting: the ranks'
clocks line up to within that meeting's skew where every process's first such communicator was
the same one (one over MPI.COMM_WORLD, as pycomm.torch and pycomm.train make).

An event spans a call from entry to return: for device arrays, until the work is queued, not
done; for allreduce_async, the call that issues it, and then its Work's wait() (args: how long
the work ran on the progress thread). It costs about 9 us per call; without a timeline, nothing.
"""

import functools
import json
import os
import threading
import time

from mpi4py import MPI

_files = {}  # path -> TimelineFile: one per process, whatever the number of communicators
_files_lock = threading.Lock()


class TimelineFile:
    """A trace file this process appends events to."""

    def __init__(self, path: str, start: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if start else 0)
        self._fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()
        self.origin_ns = None  # time zero of every event: set once the ranks have met
        if start:
            os.write(self._fd, b"[\n")

    def add(self, event: dict) -> None:
        # default=str: dtypes come as they are (str() of a numpy dtype costs microseconds).
        line = (json.dumps(event, separators=(",", ":"), default=str) + ",\n").encode()
        with self._lock:
            os.write(self._fd, line)


def timeline_for(path, comm):
    """The Timeline of a communicator over `comm` (None where `path` is None). Collective: every
    rank calls it, with a timeline or not. The ranks first compare their settings, so that every
    rank raises, before any other collective, where the paths differ or some rank could not open
    the file. Where no rank of `comm` has the file open yet, the one of lowest world rank starts
    it afresh (its first line, `[`), and the others open it only after that."""
    path = None if path is None else os.path.abspath(path)
    with _files_lock:
        opened = _files.get(path) if path is not None else None
    world_rank = MPI.COMM_WORLD.rank
    said = comm.allgather((path, opened is not None, world_rank))
    if len({p for p, _, _ in said}) > 1:
        raise ValueError(
            "pycomm: PYCOMM_TIMELINE (timeline=) differs between ranks, or is set on some only: "
            f"set it alike on every rank ({sorted({str(p) for p, _, _ in said})})"
        )
    if path is None:
        return None
    starter = None if any(has for _, has, _ in said) else min(rank for _, _, rank in said)
    error = None
    if starter == world_rank:
        error = _open(path, start=True)
    comm.Barrier()  # the file is started before anyone appends
    if opened is None and starter != world_rank:
        error = _open(path, start=False)
    if not all(comm.allgather(error is None)):
        if error is not None:
            raise OSError(f"pycomm: cannot open the timeline file {path!r}: {error}") from error
        raise OSError("pycomm: another rank could not open the timeline file (see its error)")
    opened = _files[path]
    if opened.origin_ns is None:
        opened.origin_ns = time.perf_counter_ns()
    return Timeline(opened)


def _open(path: str, start: bool):
    """Opens this process's file for `path`; returns the OSError, if any."""
    try:
        with _files_lock:
            if path not in _files:
                _files[path] = TimelineFile(path, start)
    except OSError as e:
        return e
    return None


class Timeline:
    """One communicator's events in a trace file."""

    def __init__(self, opened: TimelineFile):
        self._file = opened
        self._pid = MPI.COMM_WORLD.rank
        self._origin_ns = self._file.origin_ns
        self._file.add({"name": "process_name", "ph": "M", "pid": self._pid, "args": {"name": f"rank {self._pid}"}})

    def record(self, name: str, start_ns: int, end_ns: int, args: dict) -> None:
        self._file.add(
            {
                "name": name,
                "cat": "pycomm",
                "ph": "X",
                "ts": (start_ns - self._origin_ns) / 1e3,
                "dur": (end_ns - start_ns) / 1e3,
                "pid": self._pid,
                "tid": threading.get_native_id(),
                "args": args,
            }
        )

    def traced(self, name: str, comm):
        """comm's collective `name`, recording an event per call with what it was given. Like a
        bound method it keeps comm alive (a cycle through comm's attributes, which the garbage
        collector frees; close() frees the native resources at once)."""
        function = getattr(type(comm), name)

        @functools.wraps(function)
        def call(*args, **kwargs):
            start = time.perf_counter_ns()
            error = None
            try:
                result = function(comm, *args, **kwargs)
            except BaseException as e:
                error = e
                raise
            finally:
                self.record(name, start, time.perf_counter_ns(), _describe(args, kwargs, error))
            if name == "allreduce_async":
                self._trace_wait(result)
            return result

        return call

    def _trace_wait(self, work) -> None:
        wait = work.wait

        def traced_wait():
            start = time.perf_counter_ns()
            try:
                return wait()
            finally:
                self.record("allreduce_async: wait", start, time.perf_counter_ns(), {"ran_us": work.seconds * 1e6})

        work.wait = traced_wait


def _describe(args: tuple, kwargs: dict, error) -> dict:
    """The event's args: the input's size and dtype, the op, root and output given by keyword,
    the error raised."""
    out = {}
    if args:
        x = args[0]
        nbytes = getattr(x, "nbytes", None)
        if isinstance(nbytes, int):
            out["bytes"] = nbytes
        dtype = getattr(x, "dtype", None)
        if dtype is not None:
            out["dtype"] = dtype  # named when written
    for key in ("op", "root"):
        if key in kwargs:
            out[key] = str(kwargs[key])
    if kwargs.get("out") is not None:
        out["in_place"] = kwargs["out"] is (args[0] if args else None)
    if error is not None:
        out["error"] = f"{type(error).__name__}: {error}"
    return out
