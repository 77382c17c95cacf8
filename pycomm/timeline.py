"""The timeline (PYCOMM_TIMELINE=path, or Communicator(timeline=path)): every collective call of
every rank as an event in one Chrome trace file, for chrome://tracing or https://ui.perfetto.dev,
as Horovod's HOROVOD_TIMELINE gives.

The file is in the trace format's JSON array form, whose closing bracket is optional: every rank
appends each event as it happens, one whole line per write (O_APPEND), so no rank waits for
another to write it, and the events of a rank that dies or is aborted mid-call stay readable.
Appends from several processes keep whole lines on a local file system, not on NFS: on several
nodes, put `{rank}` in the path (`/tmp/trace.{rank}.json`, node-local) for a file per rank. Each
rank is a process of the trace (pid: its rank in MPI.COMM_WORLD), each calling thread a thread.
Times are microseconds from the creation of the process's first communicator with a timeline,
which ends with the ranks meeting: the ranks' clocks line up to within that meeting's skew where
every process's first such communicator was the same one (one over MPI.COMM_WORLD, as
pycomm.torch and pycomm.train make), and, across nodes, as far as the nodes' clocks agree.

An event spans a call from entry to return: for device arrays, until the work is queued, not
done; for allreduce_async, the call that issues it, and then its Work's wait() (args: how long
the work ran on the progress thread). It costs about 9 us per call; without a timeline, nothing.
"""

import functools
import json
import os
import sys
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
        self._path = path
        self._lock = threading.Lock()
        self.origin_ns = None  # time zero of every event: set once the ranks have met
        if start:
            os.write(self._fd, b"[\n")

    def add(self, event: dict) -> None:
        """Appends `event` as one line. Best effort: a collective that has run on every rank must
        not fail on one for its trace, so a failed write (a full disk) ends this file's trace
        here, said once on stderr."""
        # default=str: dtypes come as they are (str() of a numpy dtype costs microseconds).
        line = (json.dumps(event, separators=(",", ":"), default=str) + ",\n").encode()
        with self._lock:
            if self._fd is None:
                return
            try:
                while line:
                    line = line[os.write(self._fd, line) :]
            except OSError as e:
                os.close(self._fd)
                self._fd = None
                sys.stderr.write(f"pycomm: the timeline stops here, {self._path!r} cannot be written: {e}\n")


def timeline_for(setting, comm):
    """The Timeline of a communicator over `comm` (None where `setting` is None). Collective: every
    rank calls it, with a timeline or not. The ranks first compare their settings, so that every
    rank raises, before any other collective, where they differ or some rank could not open its
    file. A setting with `{rank}` names a file per rank (world rank), which each rank starts
    afresh: the form for several nodes. Otherwise all share one file: where no rank of `comm` has
    it open yet, the one of lowest world rank starts it, and the others open it only after that
    (communicators on disjoint groups that start the same file at once race: trace from one that
    spans every tracing rank first, such as MPI.COMM_WORLD's)."""
    setting = None if setting is None else str(setting)
    world_rank = MPI.COMM_WORLD.rank
    path, opened, error = None, None, None
    if setting is not None:
        try:
            path = os.path.abspath(setting.replace("{rank}", str(world_rank)))
            with _files_lock:
                opened = _files.get(path)
        except (OSError, ValueError) as e:
            error = e
    said = comm.allgather((setting, opened is not None, world_rank))
    if len({s for s, _, _ in said}) > 1:
        raise ValueError(
            "pycomm: PYCOMM_TIMELINE (timeline=) differs between ranks, or is set on some only: "
            f"set it alike on every rank ({sorted({str(s) for s, _, _ in said})})"
        )
    if setting is None:
        return None
    own_file = "{rank}" in setting
    starter = None if any(has for _, has, _ in said) else min(rank for _, _, rank in said)
    if error is None and opened is None and (own_file or starter == world_rank):
        error = _open(path, start=True)
    comm.Barrier()  # the shared file is started before anyone appends
    if error is None and path not in _files:
        error = _open(path, start=False)
    if not all(comm.allgather(error is None)):
        if error is not None:
            raise OSError(f"pycomm: cannot open the timeline file {setting!r}: {error}") from error
        raise OSError("pycomm: another rank could not open the timeline file (see its error)")
    opened = _files[path]
    if opened.origin_ns is None:
        opened.origin_ns = time.perf_counter_ns()
    return Timeline(opened)


def _open(path: str, start: bool):
    """Opens this process's file for `path`; returns the error, if any."""
    try:
        with _files_lock:
            if path not in _files:
                _files[path] = TimelineFile(path, start)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
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
