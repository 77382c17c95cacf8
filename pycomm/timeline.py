"""The timeline (PYCOMM_TIMELINE=path, or Communicator(timeline=path)): every collective call of
every rank as an event in one Chrome trace file, for chrome://tracing or https://ui.perfetto.dev,
as Horovod's HOROVOD_TIMELINE gives.

The file is in the trace format's JSON array form, whose closing bracket is optional: every rank
appends its own events to it (O_APPEND, whole lines per write), so no rank waits for another to
write it, and a rank that dies leaves the others' events readable. Each rank is a process of the
trace (pid: its rank in MPI.COMM_WORLD), each calling thread a thread. Times are microseconds
from the creation of the process's first communicator with a timeline, which ends in a barrier,
so the ranks' clocks line up to within the barrier's skew.

An event spans a call from entry to return: for device arrays, until the work is queued, not
done; for allreduce_async, the call that issues it, and then its Work's wait() (args: how long
the work ran on the progress thread).
"""

import functools
import json
import os
import threading
import time
import weakref

from mpi4py import MPI

# Events a rank keeps before it appends them to the file.
FLUSH_EVERY = 256

_files = {}  # path -> TimelineFile: one per process, whatever the number of communicators
_files_lock = threading.Lock()


class TimelineFile:
    """A trace file this process appends events to."""

    def __init__(self, path: str, fresh: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0)
        self._fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()
        self._pending = []
        self.origin_ns = None  # time zero of every event: set once the ranks have met
        if fresh:
            os.write(self._fd, b"[\n")

    def add(self, event: dict) -> None:
        """Keeps `event` (a dict, serialised at the next flush: JSON is most of an event's cost)."""
        with self._lock:
            self._pending.append(event)
            if len(self._pending) >= FLUSH_EVERY:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending and self._fd is not None:
            # default=str: dtypes and ops are kept as they came (str() of a numpy dtype costs
            # microseconds) and named here.
            lines = "".join(json.dumps(e, separators=(",", ":"), default=str) + ",\n" for e in self._pending)
            os.write(self._fd, lines.encode())
        self._pending = []


def _file(path: str) -> TimelineFile:
    """This process's file for `path`; world rank 0 starts it afresh when it first opens it."""
    with _files_lock:
        opened = _files.get(path)
        if opened is None:
            opened = _files[path] = TimelineFile(path, fresh=MPI.COMM_WORLD.rank == 0)
        return opened


def timeline_for(path, comm):
    """The Timeline of a communicator over `comm` (None where `path` is None). Collective: every
    rank calls it, with a timeline or not, and they meet once. That keeps every rank's first
    events after world rank 0 has started the file, lines up the ranks' time zero, and makes every
    rank raise, before any other collective, where the setting differs between ranks or some
    rank could not open the file."""
    opened, error = None, None
    if path is not None:
        try:
            opened = _file(path)
        except OSError as e:
            error = e
    said = comm.allgather((path is not None, error is None))
    if len({wants for wants, _ in said}) > 1:
        raise ValueError("pycomm: PYCOMM_TIMELINE (timeline=) is set on some ranks only: set it alike on every rank")
    if error is not None:
        raise OSError(f"pycomm: cannot open the timeline file {path!r}: {error}") from error
    if not all(ok for _, ok in said):
        raise OSError("pycomm: another rank could not open the timeline file (see its error)")
    if opened is None:
        return None
    if opened.origin_ns is None:
        opened.origin_ns = time.perf_counter_ns()
    return Timeline(opened)


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
        """comm's collective `name`, recording an event per call with what it was given. Holds
        comm weakly: the communicator keeps it as an attribute, and no cycle then delays freeing
        a communicator dropped without close()."""
        function = getattr(type(comm), name)
        owner = weakref.ref(comm)

        @functools.wraps(function)
        def call(*args, **kwargs):
            start = time.perf_counter_ns()
            error = None
            try:
                result = function(owner(), *args, **kwargs)
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

    def flush(self) -> None:
        self._file.flush()


def _describe(args: tuple, kwargs: dict, error) -> dict:
    """The event's args: the input's size and dtype, the keywords given, the error raised."""
    out = {}
    if args:
        x = args[0]
        nbytes = getattr(x, "nbytes", None)
        if isinstance(nbytes, int):
            out["bytes"] = nbytes
        dtype = getattr(x, "dtype", None)
        if dtype is not None:
            out["dtype"] = dtype  # named at the flush
    for key in ("op", "root"):
        if key in kwargs:
            out[key] = str(kwargs[key])
    if kwargs.get("out") is not None:
        out["in_place"] = kwargs["out"] is (args[0] if args else None)
    if error is not None:
        out["error"] = f"{type(error).__name__}: {error}"
    return out
