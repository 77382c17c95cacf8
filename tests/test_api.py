"""The Python API in one process (a size-1 communicator): results, argument checks, settings."""

import ml_dtypes
import numpy as np
import pytest

import pycomm
from pycomm import settings


@pytest.fixture
def comm():
    with pycomm.Communicator() as c:
        yield c


def test_attributes(comm):
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    assert "rank 0 of 1" in repr(comm)


@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg", pycomm.ReduceOp.MAX, "SUM"])
def test_allreduce_single_rank_is_identity(comm, op):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = comm.allreduce(x, op=op)
    assert y is not x and y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(y, x)


def test_allreduce_out_and_in_place(comm):
    x = np.arange(5, dtype=np.int64)
    out = np.zeros(5, np.int64)
    assert comm.allreduce(x, out=out) is out and np.array_equal(out, x)
    assert comm.allreduce(x, out=x) is x


def test_bfloat16_and_empty(comm):
    x = np.ones(3, ml_dtypes.bfloat16)
    assert comm.allreduce(x).dtype == x.dtype
    assert comm.allreduce(np.zeros((0, 4), np.float64)).shape == (0, 4)


def test_async(comm):
    x = np.ones(100, np.float32)
    work = comm.allreduce_async(x, op="avg")
    y = work.wait()
    assert work.done() and np.array_equal(y, x)


def test_async_numpy_takes_the_fast_path(comm):
    """A plain numpy allreduce_async goes straight to the native call (a few us of Python checks
    otherwise); anything unusual takes the full path."""
    log = comm._native = _NativeCallLog(comm._native)
    try:
        x = np.arange(5, dtype=np.float64)
        assert comm.allreduce_async(x, out=x).wait() is x and np.array_equal(x, np.arange(5))
        y = comm.allreduce_async(x, op="max").wait()
        assert y.dtype == x.dtype and np.array_equal(y, x) and y is not x
        assert [n for n in log.names if n != "size"] == ["allreduce_async_if_plain"] * 2
        b = np.arange(4).astype(ml_dtypes.bfloat16)  # not a dtype the fast path knows
        assert np.array_equal(comm.allreduce_async(b, op="max").wait(), b)
        assert log.names[-1] == "allreduce_async"
    finally:
        comm._native = log.native


def test_reduce_scatter_allgather_broadcast_barrier(comm):
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert np.array_equal(comm.reduce_scatter(x), x)
    assert np.array_equal(comm.allgather(x), x)
    assert comm.allgather(np.array(5)).shape == (1,)
    assert comm.broadcast(x) is x
    comm.barrier()


def test_close_is_idempotent_and_final():
    comm = pycomm.Communicator()
    comm.close()
    comm.close()
    assert "closed" in repr(comm)
    for call in (
        lambda: comm.allreduce(np.ones(2)),
        lambda: comm.allreduce_async(np.ones(2)),
        lambda: comm.reduce_scatter(np.ones(2)),
        lambda: comm.allgather(np.ones(2)),
        lambda: comm.broadcast(np.ones(2)),
        comm.barrier,
    ):
        with pytest.raises(pycomm.CommError, match="closed"):
            call()


def _read_only(a):
    a.setflags(write=False)
    return a


def test_close_while_other_threads_call():
    """close() from one thread while others are inside collectives: each of them either finishes
    its call or gets CommError; none crashes or hangs. The race is narrow, so try it many times."""
    import threading

    x = np.ones(8)
    for _ in range(2000):
        comm = pycomm.Communicator()
        outcomes = []
        started = threading.Event()

        def loop(comm=comm, outcomes=outcomes, started=started):
            started.set()
            try:
                while True:
                    comm.allreduce(x)
            except pycomm.CommError as error:
                outcomes.append(str(error))

        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        started.wait()
        comm.close()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert len(outcomes) == 3 and all("closed" in o for o in outcomes), outcomes


BAD_INPUTS = [
    ("a list", lambda c: c.allreduce([1.0, 2.0]), TypeError),
    ("object dtype", lambda c: c.allreduce(np.array([1, "a"], dtype=object)), TypeError),
    ("structured dtype", lambda c: c.allreduce(np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])), TypeError),
    ("complex dtype", lambda c: c.allreduce(np.zeros(3, np.complex64)), TypeError),
    ("bool dtype", lambda c: c.allreduce(np.zeros(3, bool)), TypeError),
    ("byte-swapped dtype", lambda c: c.allreduce(np.zeros(3, ">f4")), TypeError),
    ("non-contiguous x", lambda c: c.allreduce(np.zeros((4, 4), np.float32)[:, 1]), ValueError),
    ("read-only out", lambda c: c.allreduce(np.zeros(3), out=_read_only(np.zeros(3))), ValueError),
    ("out of another shape", lambda c: c.allreduce(np.zeros(3), out=np.zeros(4)), ValueError),
    ("out of another dtype", lambda c: c.allreduce(np.zeros(3), out=np.zeros(3, np.float32)), TypeError),
    ("non-contiguous out", lambda c: c.allreduce(np.zeros(2), out=np.zeros(4)[::2]), ValueError),
    ("out overlapping x", lambda c: (lambda b: c.allreduce(b[:4], out=b[1:5]))(np.zeros(5)), ValueError),
    ("unknown op", lambda c: c.allreduce(np.zeros(3), op="xor"), ValueError),
    ("op of wrong type", lambda c: c.allreduce(np.zeros(3), op=7), ValueError),
    ("avg of integers", lambda c: c.allreduce(np.zeros(3, np.int32), op="avg"), ValueError),
    ("async avg of integers", lambda c: c.allreduce_async(np.zeros(3, np.int32), op="avg"), ValueError),
    ("reduce_scatter of a 0-d array", lambda c: c.reduce_scatter(np.zeros(())), ValueError),
    ("allgather into a wrong out", lambda c: c.allgather(np.zeros(3), out=np.zeros(2)), ValueError),
    # In place, x must be exactly this rank's block of out (allgather), out of x (reduce_scatter).
    ("allgather x inside out elsewhere", lambda c: (lambda b: c.allgather(b[1:], out=b[:3]))(np.zeros(4)), ValueError),
    ("reduce_scatter out elsewhere", lambda c: (lambda b: c.reduce_scatter(b[:3], out=b[1:]))(np.zeros(4)), ValueError),
    ("negative root", lambda c: c.broadcast(np.zeros(3), root=-1), ValueError),
    ("root past the last rank", lambda c: c.broadcast(np.zeros(3), root=1), ValueError),
    ("root of wrong type", lambda c: c.broadcast(np.zeros(3), root="0"), TypeError),
    ("root past a C int", lambda c: c.broadcast(np.zeros(3), root=1 << 40), ValueError),
    # A zero-stride view's shape is far larger than its memory: refused, not allocated for.
    ("zero-stride x", lambda c: c.allreduce(np.broadcast_to(np.float32(0), (1 << 40,))), ValueError),
    ("zero-stride allgather", lambda c: c.allgather(np.broadcast_to(np.float32(0), (1 << 40,))), ValueError),
    ("zero-stride reduce_scatter", lambda c: c.reduce_scatter(np.broadcast_to(np.float32(0), (1 << 40,))), ValueError),
    ("read-only broadcast buffer", lambda c: c.broadcast(np.frombuffer(b"12345678", np.uint8)), ValueError),
]


def _torch_bad_inputs():
    import torch

    return [
        ("tensor that requires grad", lambda c: c.allreduce(torch.ones(3, requires_grad=True)), ValueError),
        ("non-contiguous tensor", lambda c: c.allreduce(torch.ones(4, 4).T), ValueError),
        ("tensor out of another dtype", lambda c: c.allreduce(torch.ones(3), out=torch.ones(3, dtype=torch.float64)),
         TypeError),
        ("complex tensor", lambda c: c.allreduce(torch.ones(3, dtype=torch.complex64)), TypeError),
        ("lazily negated tensor in place", lambda c: (lambda t: c.allreduce(t, out=t))(torch._neg_view(torch.ones(3))),
         ValueError),
        ("tensor that requires grad, in place", lambda c: (lambda t: c.allreduce(t, out=t))(
            torch.ones(3, requires_grad=True)), ValueError),
        ("non-contiguous tensor in place", lambda c: (lambda t: c.allreduce(t, out=t))(torch.ones(4, 4).T), ValueError),
        ("channels-last tensor", lambda c: c.allreduce(torch.ones(1, 3, 2, 2).to(memory_format=torch.channels_last)),
         ValueError),
        ("avg of an integer tensor in place", lambda c: (lambda t: c.allreduce(t, op="avg", out=t))(
            torch.ones(3, dtype=torch.int32)), ValueError),
    ]  # fmt: skip


BAD_INPUTS += _torch_bad_inputs()


@pytest.mark.parametrize("what,call,error", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_and_leaves_communicator_usable(comm, what, call, error):
    with pytest.raises(error, match="pycomm"):
        call(comm)
    assert np.array_equal(comm.allreduce(np.ones(3)), np.ones(3))


def test_not_a_communicator():
    with pytest.raises(TypeError, match="intracommunicator"):
        pycomm.Communicator("world")


def test_settings_from_keywords_and_environment(monkeypatch):
    monkeypatch.setenv("PYCOMM_TIMEOUT", "12.5")
    monkeypatch.setenv("PYCOMM_CHUNK_BYTES", "64K")
    with pycomm.Communicator() as c:
        assert (c.timeout, c.chunk_bytes) == (12.5, 64 << 10)
    with pycomm.Communicator(timeout=3, chunk_bytes=256) as c:
        assert (c.timeout, c.chunk_bytes) == (3, 256)


@pytest.mark.parametrize(
    "name,value",
    [
        ("PYCOMM_TIMEOUT", "soon"),
        ("PYCOMM_TIMEOUT", "-1"),
        ("PYCOMM_CHUNK_BYTES", "4"),
        ("PYCOMM_CHUNK_BYTES", "4G"),
        ("PYCOMM_SHM", "false"),  # the core reads only 0 and 1: refused, not ignored
        ("PYCOMM_CMA", "off"),
        ("PYCOMM_KERNELS", "avx512"),
    ],
)
def test_bad_settings(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="pycomm"):
        pycomm.Communicator()


def test_parse_size():
    assert [settings.parse_size(s) for s in ("8", "64K", "1M", "1MiB", "2G", 5)] == [
        8,
        65536,
        1 << 20,
        1 << 20,
        2 << 30,
        5,
    ]


@pytest.mark.parametrize("bad", ["-1", "1.5", "inf", "nan", "lots", True, -3])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="pycomm"):
        settings.parse_size(bad)


@pytest.mark.parametrize("value,on", [("0", False), ("off", False), ("1", True), (0, False), (True, True)])
def test_debug_setting_reads_strings_as_the_variable(value, on):
    assert settings.debug(value) is on


def test_debug_lines_are_rank_prefixed(capfd):
    with pycomm.Communicator(debug=True) as c:
        c.allreduce(np.ones(10, np.float32))
    assert "r0 | allreduce #1 float32 x 10 sum" in capfd.readouterr().err


def test_build_and_runtime_mpi_agree():
    assert pycomm.BUILD_MPI.split()[0].lower() in pycomm.RUNTIME_MPI.lower()


class _NativeCallLog:
    """Passes a communicator's native core through, noting the name of each entry used."""

    def __init__(self, native):
        self.native, self.names = native, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.native, name)


def test_torch_cpu_tensor_in_place_takes_the_fast_path(comm):
    """A plain torch CPU tensor, in place or into a new tensor, goes to the native fast path numpy
    arrays take (not through the full checks, 5-8 us of Python per call); bfloat16, which numpy
    lacks, takes the full path's view."""
    torch = pytest.importorskip("torch")
    log = comm._native = _NativeCallLog(comm._native)
    try:
        x = torch.arange(6, dtype=torch.float32)
        assert comm.allreduce(x, out=x) is x and torch.equal(x, torch.arange(6, dtype=torch.float32))
        y = comm.allreduce(x, op="max")  # into a new tensor, as pycomm.torch.allreduce
        assert type(y) is torch.Tensor and y.dtype == x.dtype and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
        assert log.names == ["allreduce_if_plain"] * 2
        b = torch.arange(4).to(torch.bfloat16)
        assert comm.allreduce(b, op="max", out=b) is b and torch.equal(b, torch.arange(4).to(torch.bfloat16))
        assert log.names[-1] == "allreduce"
    finally:
        comm._native = log.native


def _torch_cpu_writes():
    """(name, call(comm, x, y)): collectives that write into the caller's tensor x (y: input)."""
    return [
        ("allreduce in place", lambda c, x, y: c.allreduce(x, out=x)),
        ("allreduce in place, bfloat16", lambda c, x, y: c.allreduce(x, out=x)),
        ("allreduce into out", lambda c, x, y: c.allreduce(y, out=x)),
        ("allreduce_async in place", lambda c, x, y: c.allreduce_async(x, out=x).wait()),
        ("allreduce_async into out", lambda c, x, y: c.allreduce_async(y, out=x).wait()),
        ("reduce_scatter into out", lambda c, x, y: c.reduce_scatter(y, out=x)),
        ("allgather into out", lambda c, x, y: c.allgather(y, out=x)),
        ("broadcast", lambda c, x, y: c.broadcast(x)),
    ]


@pytest.mark.parametrize("name,call", _torch_cpu_writes(), ids=[w[0] for w in _torch_cpu_writes()])
def test_torch_cpu_writes_raise_the_tensor_version(comm, name, call):
    """As torch's own in-place operations do: autograd then refuses a backward that saved the
    tensor's old values instead of silently using the new ones."""
    torch = pytest.importorskip("torch")
    dtype = torch.bfloat16 if "bfloat16" in name else torch.float32
    x, y = torch.zeros(4, dtype=dtype), torch.arange(4).to(dtype)
    if "in place" in name or name == "broadcast":
        x = y.clone()
    before = x._version
    call(comm, x, y)
    assert x._version == before + 1 and torch.equal(x, y)


def test_autograd_refuses_a_backward_through_a_tensor_reduced_in_place(comm):
    torch = pytest.importorskip("torch")
    w = torch.ones(3, requires_grad=True)
    saved = torch.full((3,), 2.0)
    loss = (w * saved).sum()  # saves `saved` for the backward
    comm.allreduce(saved, out=saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_contiguous_tensor_error_names_torchs_remedy(comm):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"use \.contiguous\(\)"):
        comm.allreduce(torch.ones(1, 3, 2, 2).to(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="np.ascontiguousarray"):
        comm.allreduce(np.ones((4, 4)).T)


def test_plain_numpy_collectives_take_the_fast_paths(comm):
    """broadcast, allgather and reduce_scatter of plain numpy arrays go straight to the native
    fast paths (a few us of Python checks each otherwise); anything unusual takes the full path."""
    log = comm._native = _NativeCallLog(comm._native)
    try:
        a = np.arange(6, dtype=np.float32).reshape(3, 2)
        assert comm.broadcast(a) is a
        assert np.array_equal(comm.allgather(a), a) and np.array_equal(comm.reduce_scatter(a, op="max"), a)
        out = np.empty_like(a)
        assert comm.allgather(a, out=out) is out and comm.reduce_scatter(a, out=out) is out
        assert np.array_equal(comm.allgather(np.array(2.5)), [2.5])  # a 0-d x gathers to shape (size,)
        fast = [n for n in log.names if n != "size"]
        assert fast == ["broadcast_if_plain"] + ["allgather_if_plain", "reduce_scatter_if_plain"] * 2 + [
            "allgather_if_plain"
        ]
        del log.names[:]
        comm.broadcast(a, root=np.int64(0))  # a numpy integer root: the full path's check
        assert "broadcast" in log.names
    finally:
        comm._native = log.native


def test_timeline_records_each_call(tmp_path):
    """Communicator(timeline=path): a Chrome trace event per call; without one the collectives
    are the class's own methods (nothing is paid per call)."""
    import json

    with pycomm.Communicator() as plain:
        assert "allreduce" not in vars(plain)
    path = tmp_path / "trace.json"
    with pycomm.Communicator(timeline=path) as c:
        x = np.ones(4, np.float32)
        c.allreduce(x, op="max", out=x)
        c.allreduce_async(x).wait()
        c.barrier()
    events = json.loads(path.read_text().rstrip().rstrip(",") + "]")
    calls = [(e["name"], e["args"]) for e in events if e["ph"] == "X"]
    assert [name for name, _ in calls] == ["allreduce", "allreduce_async", "allreduce_async: wait", "barrier"]
    assert calls[0][1] == {"bytes": 16, "dtype": "float32", "op": "max", "in_place": True}


def test_inference_tensors_are_written_without_a_version(comm, monkeypatch):
    """Autograd never saves an inference tensor, and some torch builds refuse to raise its version
    outside inference mode: the call must not fail after its write for that."""
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        t = torch.ones(3)

    def refuse(tensor):
        if tensor.is_inference():
            raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed")

    monkeypatch.setattr(torch.autograd.graph, "increment_version", refuse)
    assert comm.allreduce(t, out=t) is t and comm.broadcast(t) is t
    assert comm.allreduce_async(t, out=t).wait() is t


def test_timeline_that_cannot_be_written_stops_without_failing_calls(tmp_path, capfd):
    """A collective that ran must not fail on one rank for its trace (a full disk, say)."""
    import os

    with pycomm.Communicator(timeline=tmp_path / "trace.json") as c:
        trace = c._timeline._file
        os.close(trace._fd)
        trace._fd = os.open(tmp_path / "trace.json", os.O_RDONLY)  # every write now fails
        x = np.ones(3)
        assert c.allreduce(x, out=x) is x and c.allreduce(x, out=x) is x
    assert capfd.readouterr().err.count("the timeline stops here") == 1
