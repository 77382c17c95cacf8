"""pycomm for PyTorch, in the shape Horovod users know.

    import pycomm.torch as pt
    pt.init()                                            # over MPI.COMM_WORLD
    pt.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    pt.broadcast_optimizer_state(optimizer, root_rank=0)  # after rank 0 loaded a checkpoint
    loss.backward(); optimizer.step()                    # gradients averaged over the ranks

Also as in Horovod: allreduce / allreduce_ (in place), allreduce_async / allreduce_async_ with
synchronize / poll, allgather (first dimensions may differ), reducescatter, broadcast /
broadcast_, broadcast_object, allgather_object, barrier, shutdown. `name=` is accepted, as
Horovod's, and unused: ranks pair their calls by order, as with NCCL.

CPU tensors go through the engine as zero-copy views, CUDA tensors through the device path (a
CUDA parameter's bucket lives on its GPU).
DistributedOptimizer copies each gradient into a fused bucket as soon as autograd has
accumulated it; a bucket's averaging allreduce starts once all its gradients are in, so
communication overlaps the rest of backward. Buckets live in the shared segment of the
optimizer's own communicator (a dup() of the one it is given) where the node has one, and start in
the same order on every rank.
"""

import contextlib
import functools
import pickle
import threading
import weakref

import numpy as np
import torch

from .bucketing import plan_buckets
from .communicator import Communicator
from .ops import ReduceOp, parse_op

_default = None

# Horovod's names for the reductions.
Average, Sum, Min, Max, Product = "avg", "sum", "min", "max", "prod"


def init(comm=None, **settings) -> Communicator:
    """Creates the module's communicator (collective); later calls return the same one."""
    global _default
    if _default is None:
        _default = Communicator(comm, **settings)
    return _default


def _comm(comm) -> Communicator:
    if comm is None:
        return init()
    if not isinstance(comm, Communicator):
        raise TypeError(f"pycomm: comm= takes a pycomm.Communicator, not a {type(comm).__name__}")
    return comm


def is_initialized() -> bool:
    return _default is not None


def shutdown() -> None:
    """Closes the module's communicator; a later init() creates a new one (collective)."""
    global _default
    if _default is not None:
        _default.close()
        _default = None


def rank() -> int:
    return init().rank


def size() -> int:
    return init().size


def local_rank() -> int:
    return init().local_rank


def local_size() -> int:
    return init().local_size


def allreduce(tensor: torch.Tensor, op=Average, comm=None, name=None) -> torch.Tensor:
    """A new tensor: `tensor` reduced over the ranks (average by default, as in Horovod).
    Differentiable for Sum and Average (see _Allreduce); with the others the result is a constant."""
    comm = _comm(comm)
    if _tracks_gradient(tensor, op):
        return _Allreduce.apply(tensor, op, comm)
    return comm.allreduce(tensor.detach().contiguous(), op=op)


def _tracks_gradient(tensor: torch.Tensor, op=Sum) -> bool:
    """Whether the collective joins autograd's graph: only sum and avg have a gradient; with the
    other ops the result is a constant."""
    return tensor.requires_grad and torch.is_grad_enabled() and parse_op(op) in (ReduceOp.SUM, ReduceOp.AVG)


# Gradients flow back as for the sum of every rank's loss (as through torch.distributed.nn's
# collectives): each rank's input gets its share of every rank's output gradient.
class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, comm):
        ctx.op, ctx.comm = op, comm
        return comm.allreduce(tensor.detach().contiguous(), op=op)

    @staticmethod
    def backward(ctx, grad):
        return allreduce(grad.contiguous(), ctx.op, ctx.comm), None, None


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm):
        ctx.comm, ctx.shape = comm, tensor.shape
        result, ctx.rows = _gather(comm, tensor.detach().contiguous())
        return result

    @staticmethod
    def backward(ctx, grad):
        # Each rank's rows of the summed gradient: a reduce-scatter, which moves half the bytes
        # of an allreduce of the whole.
        return _scatter_rows(ctx.comm, grad.contiguous(), Sum, ctx.rows).reshape(ctx.shape), None


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, comm):
        ctx.op, ctx.comm = op, comm
        return _scatter_rows(comm, tensor.detach().contiguous(), op)

    @staticmethod
    def backward(ctx, grad):
        every = allgather(grad.contiguous(), ctx.comm)
        return (every / ctx.comm.size if parse_op(ctx.op) == ReduceOp.AVG else every), None, None


def allreduce_(tensor: torch.Tensor, op=Average, comm=None, name=None) -> torch.Tensor:
    """Reduces `tensor` over the ranks in place (average by default) and returns it."""
    comm = _comm(comm)
    return _in_place(tensor, lambda t: comm.allreduce(t, op=op, out=t))


class Handle:
    """An allreduce_async in flight: pass it to synchronize() (or poll() it)."""

    def __init__(self, work, tensor: torch.Tensor, staged: torch.Tensor):
        self._work, self._tensor, self._staged = work, tensor, staged

    def _finish(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._staged is not self._tensor:
                with torch.no_grad():
                    self._tensor.copy_(self._staged)
        return self._tensor


def allreduce_async(tensor: torch.Tensor, op=Average, comm=None, name=None) -> Handle:
    """Starts reducing `tensor` into a new tensor; synchronize(handle) returns it."""
    staged = tensor.detach().clone(memory_format=torch.contiguous_format)
    return Handle(_comm(comm).allreduce_async(staged, op=op, out=staged), staged, staged)


def allreduce_async_(tensor: torch.Tensor, op=Average, comm=None, name=None) -> Handle:
    """Starts reducing `tensor` in place; synchronize(handle) returns it. Leave `tensor` alone
    until then."""
    staged = _contiguous(tensor.detach())
    return Handle(_comm(comm).allreduce_async(staged, op=op, out=staged), tensor, staged)


def synchronize(handle: Handle) -> torch.Tensor:
    """Waits for `handle`'s allreduce and returns its result."""
    return handle._finish()


def poll(handle: Handle) -> bool:
    """True once synchronize(handle) would not block."""
    return handle._work is None or handle._work.done()


def allgather(tensor: torch.Tensor, comm=None, name=None) -> torch.Tensor:
    """A new tensor: every rank's `tensor` concatenated along dimension 0, in rank order. The
    first dimensions may differ between ranks; the others, and the dtype, must not.
    Differentiable (see _Allreduce)."""
    comm = _comm(comm)
    if _tracks_gradient(tensor):
        return _Allgather.apply(tensor, comm)
    return _gather(comm, tensor.detach().contiguous())[0]


def _gather(comm, t: torch.Tensor) -> tuple:
    """allgather's result, and every rank's rows in it."""
    if t.dim() == 0:
        return comm.allgather(t), [1] * comm.size
    rows = _agree_on_rows(comm, t.shape)
    if min(rows) == max(rows):
        return comm.allgather(t), rows
    # Pad every rank's block to the longest, gather, then drop each block's padding.
    padded = t.new_zeros((max(rows), *t.shape[1:]))
    padded[: t.shape[0]] = t
    blocks = comm.allgather(padded).split(max(rows))
    return torch.cat([block[:n] for block, n in zip(blocks, rows)]), rows


def _agree_on_rows(comm, shape: torch.Size) -> list:
    """Every rank's first dimension, after checking (on every rank alike) that the other
    dimensions agree."""
    dims = comm.allgather(np.array([len(shape)], np.int64))
    if dims.min() != dims.max():
        raise ValueError(f"pycomm: allgather got tensors of {sorted(set(dims.tolist()))} dimensions on different ranks")
    shapes = comm.allgather(np.array([list(shape)], np.int64))
    if (shapes[:, 1:] != shapes[0, 1:]).any():
        raise ValueError(
            "pycomm: allgather's tensors may differ only in their first dimension; per rank: "
            + ", ".join(str(tuple(s)) for s in shapes.tolist())
        )
    return shapes[:, 0].tolist()


def reducescatter(tensor: torch.Tensor, op=Average, comm=None, name=None) -> torch.Tensor:
    """This rank's rows of `tensor` reduced over the ranks (average by default). As in Horovod,
    the rows split as evenly as they can: where they do not divide, the first ranks get one more.
    Differentiable for Sum and Average (see _Allreduce); with the others the result is a constant."""
    comm = _comm(comm)
    if _tracks_gradient(tensor, op):
        return _Reducescatter.apply(tensor, op, comm)
    return _scatter_rows(comm, tensor.detach().contiguous(), op)


def _scatter_rows(comm, t: torch.Tensor, op, rows=None) -> torch.Tensor:
    """This rank's rows of `t` reduced over the ranks, rank r getting rows[r] of them in rank
    order; by default Horovod's split: as even as they can be, the first ranks one more."""
    if t.dim() == 0:
        raise ValueError("pycomm: reducescatter needs a tensor of at least one dimension")
    if rows is None:
        even, extra = divmod(t.shape[0], comm.size)
        rows = [even + (r < extra) for r in range(comm.size)]
    longest = max(rows)
    if min(rows) == longest:
        return comm.reduce_scatter(t, op=op)
    # Pad each rank's share to the longest one's, so that the engine's equal blocks line up.
    padded = t.new_zeros((longest * comm.size, *t.shape[1:]))
    start = 0
    for r, n in enumerate(rows):
        padded[r * longest : r * longest + n] = t[start : start + n]
        start += n
    return comm.reduce_scatter(padded, op=op)[: rows[comm.rank]].clone()


def broadcast(tensor: torch.Tensor, root_rank: int = 0, comm=None, name=None) -> torch.Tensor:
    """A new tensor holding root_rank's `tensor`; `tensor` itself is left as it was."""
    return _comm(comm).broadcast(tensor.detach().clone(memory_format=torch.contiguous_format), root=root_rank)


def broadcast_(tensor: torch.Tensor, root_rank: int = 0, comm=None, name=None) -> torch.Tensor:
    """Overwrites `tensor` with root_rank's, in place, and returns it."""
    comm = _comm(comm)
    return _in_place(tensor, lambda t: comm.broadcast(t, root=root_rank))


def _in_place(tensor: torch.Tensor, collective) -> torch.Tensor:
    """Runs `collective`, which overwrites the contiguous tensor it gets, on `tensor`'s data: a
    non-contiguous tensor goes through a contiguous copy and gets the result back."""
    with torch.no_grad():
        t = tensor.detach()
        staged = _contiguous(t)
        collective(staged)
        if staged is not t:
            t.copy_(staged)
    return tensor


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself where it is contiguous, else a contiguous copy (which callers copy back)."""
    return t if t.is_contiguous() else t.contiguous()


def broadcast_parameters(params, root_rank: int = 0, comm=None) -> None:
    """Overwrites every tensor of `params` (a state_dict, named_parameters() or tensors) with
    root_rank's, in place. Every rank must pass the same tensors in the same order."""
    comm = _comm(comm)
    items = params.items() if hasattr(params, "items") else params
    for item in items:
        tensor = item[1] if isinstance(item, tuple) else item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"pycomm: broadcast_parameters got a {type(tensor).__name__}, not a tensor")
        broadcast_(tensor, root_rank, comm)


def broadcast_object(obj, root_rank: int = 0, comm=None, name=None):
    """root_rank's `obj` on every rank (pickled there; `obj` is ignored elsewhere). Through
    pycomm's own broadcast, so a rank that never comes gives an error, not a hang."""
    comm = _comm(comm)
    mine = comm.rank == root_rank
    payload = np.frombuffer(bytearray(pickle.dumps(obj)), np.uint8) if mine else None
    length = np.array([payload.size if mine else 0], np.int64)
    comm.broadcast(length, root=root_rank)
    data = comm.broadcast(payload if mine else np.empty(int(length[0]), np.uint8), root=root_rank)
    return obj if mine else pickle.loads(data.tobytes())


def allgather_object(obj, comm=None, name=None) -> list:
    """Every rank's `obj`, in rank order (pickled; the sizes may differ)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    gathered, lengths = _gather(_comm(comm), payload)
    return [pickle.loads(piece.numpy().tobytes()) for piece in gathered.split(lengths)]


def barrier(comm=None) -> None:
    """Returns once every rank has called it."""
    _comm(comm).barrier()


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, comm=None) -> None:
    """Gives every rank's `optimizer` root_rank's state: hyperparameters (learning rates...) and
    per-parameter state (momentum buffers, Adam's moments, step counts), as after root_rank
    loaded a checkpoint. Every rank's optimizer must be over the same parameters in the same
    order; the state travels through host memory and lands on each parameter's device."""
    comm = _comm(comm)
    state = None
    if comm.rank == root_rank:
        state = optimizer.state_dict()
        state = {**state, "state": {k: _on_host(v) for k, v in state["state"].items()}}
    state = broadcast_object(state, root_rank, comm)
    if comm.rank != root_rank:
        optimizer.load_state_dict(state)  # moves state tensors to their parameters' devices


def _on_host(per_param: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in per_param.items()}


class _Bucket:
    def __init__(self, comm, params: list, dtype: torch.dtype, device: torch.device):
        self.params = params
        count = sum(p.numel() for p in params)
        on_host = device.type == "cpu"
        sample = torch.empty(0, dtype=dtype).numpy() if on_host and dtype != torch.bfloat16 else None
        if sample is not None and comm.size > 1:
            # In the node's shared segment, allreduce(out=buffer) copies nothing in or out.
            self.buffer = torch.from_numpy(comm.empty(count, sample.dtype))
        else:
            # On the parameters' GPU their gradients never leave it: the device path reduces there.
            self.buffer = torch.empty(count, dtype=dtype, device=device)
        self.views, offset = {}, 0
        for p in params:
            self.views[p] = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.pending = set(params)
        self.work = None


class _DistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer, comm, bucket_bytes: int, op, backward_passes_per_step: int, names: dict):
        super(self.__class__, self).__init__(optimizer.param_groups)
        self.defaults = optimizer.defaults  # for add_param_group, as the wrapped optimizer's
        if backward_passes_per_step < 1:
            raise ValueError(f"pycomm: backward_passes_per_step must be at least 1, not {backward_passes_per_step}")
        # The gradients' allreduces go through a communicator of their own, as NCCL's process
        # groups keep theirs apart: where ranks' graphs differ (a parameter only some use), a
        # bucket starts during backward on some ranks and in synchronize() on others, and on a
        # shared communicator it would pair with the caller's own collectives in between (or
        # with those of a differentiable collective's backward).
        # Its finalizer runs at different moments on different ranks (the garbage collector's,
        # or at exit before pycomm's exit hook): it closes the dup only where closing is local,
        # and leaves one that ran device work to the exit hook, which closes in order everywhere.
        self._pycomm = comm.dup()
        weakref.finalize(self, self._pycomm._close_now_or_at_exit)
        self._op = op
        self._names = names
        self._bucket_bytes = bucket_bytes
        self._buckets, self._bucket_of = [], {}
        self._next = 0
        # Gradients accumulate locally over this many backward passes, then go to their bucket.
        self._passes = backward_passes_per_step
        self._passes_left = {}
        # Set by synchronize(), cleared by the next gradient or step(): synchronize() then step()
        # (to clip the averaged gradients in between) averages once, as Horovod does.
        self._synchronized = False
        self._skip_synchronize = False
        # Autograd runs the hooks of CPU and of each GPU's gradients on threads of their own:
        # the step's bookkeeping changes under this lock only.
        self._lock = threading.Lock()
        self._watch([p for group in self.param_groups for p in group["params"]])

    def _watch(self, params: list) -> None:
        """Buckets and gradient hooks for `params` (those that take gradients)."""
        params = [p for p in params if p.requires_grad]
        if len({id(p) for p in params}) != len(params) or any(p in self._bucket_of for p in params):
            raise ValueError("pycomm: a parameter appears twice in the optimizer's param_groups")
        buckets = _assign_buckets(self._pycomm, params, self._bucket_bytes)
        self._buckets += buckets
        self._bucket_of.update({p: b for b in buckets for p in b.params})
        self._passes_left.update(dict.fromkeys(params, self._passes))
        # A parameter outlives the optimizer it was wrapped in (a second DistributedOptimizer
        # over the same model): the newest one's hook replaces any earlier one's, on every rank
        # alike, whenever the garbage collector gets to the old optimizer.
        hook = functools.partial(_grad_hook, weakref.ref(self))
        for p in params:
            _hook_only(p, p.register_post_accumulate_grad_hook(hook))

    def add_param_group(self, param_group: dict) -> None:
        super(self.__class__, self).add_param_group(param_group)
        if hasattr(self, "_buckets"):  # not while the base class's __init__ adds the first groups
            self._watch(self.param_groups[-1]["params"])

    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(p, f"a parameter of shape {tuple(p.shape)}")

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[p]
        with self._lock:
            self._synchronized = False
            if p not in bucket.pending:
                raise RuntimeError(
                    f"pycomm: the gradient of {self._name(p)} was accumulated over more than backward_passes_per_step="
                    f"{self._passes} backward passes before step(); call step() (or synchronize()) after each "
                    "backward, or raise backward_passes_per_step"
                )
            self._passes_left[p] -= 1
            if self._passes_left[p] > 0:
                return  # accumulates in p.grad until the last pass of the step
        self._fill(p)
        with self._lock:
            bucket.pending.discard(p)
            self._start_ready()

    def _fill(self, p: torch.Tensor) -> None:
        """p's gradient into its bucket: what p.grad holds (summed over the step's passes, or
        assigned by hand), or zero where it has none, as Horovod averages them."""
        view = self._bucket_of[p].views[p]
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad.to_dense() if p.grad.is_sparse else p.grad)

    def _start_ready(self) -> None:
        # Strictly in bucket order, whatever order autograd finished them in: every rank then
        # issues the same allreduces in the same order.
        while self._next < len(self._buckets) and not self._buckets[self._next].pending:
            bucket = self._buckets[self._next]
            bucket.work = self._pycomm.allreduce_async(bucket.buffer, op=self._op, out=bucket.buffer)
            self._next += 1

    def synchronize(self) -> None:
        """Waits for every bucket and writes the averaged gradients back into p.grad. A
        parameter's gradient that no hook saw this step (none, or assigned by hand) counts as
        p.grad holds it, zero for none. Once per step: a second call (step() after
        synchronize()) does nothing until a new gradient comes."""
        if self._synchronized:
            return
        self._check_every_gradient_watched()
        with self._lock:
            pending = [p for bucket in self._buckets for p in bucket.pending]
        for p in pending:
            self._fill(p)
        with self._lock:
            for bucket in self._buckets:
                bucket.pending.clear()
            self._start_ready()
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.work = None
            for p, view in bucket.views.items():
                if p.grad is None or p.grad.is_sparse:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
            bucket.pending = set(bucket.params)
        with self._lock:
            self._next = 0
            self._passes_left = dict.fromkeys(self._passes_left, self._passes)
            self._synchronized = True

    def _check_every_gradient_watched(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None and p not in self._bucket_of:
                    raise RuntimeError(
                        f"pycomm: {self._name(p)} has a gradient but did not require one when DistributedOptimizer "
                        "wrapped the optimizer, so it is not averaged; unfreeze parameters before wrapping"
                    )

    def zero_grad(self, set_to_none: bool = True) -> None:
        if any(left < self._passes for left in self._passes_left.values()) and not self._synchronized:
            raise RuntimeError(
                "pycomm: optimizer.zero_grad() between backward() and step() would drop gradients whose averaging "
                "has begun on every rank; call optimizer.synchronize() first"
            )
        super(self.__class__, self).zero_grad(set_to_none)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's: step() inside it applies the gradients as they are (call synchronize() first)."""
        self._skip_synchronize = True
        try:
            yield
        finally:
            self._skip_synchronize = False

    def step(self, closure=None):
        loss = None
        if closure is not None:  # its backward first, so that step() averages its gradients
            with torch.enable_grad():
                loss = closure()
        if not self._skip_synchronize:
            self.synchronize()
        self._synchronized = False  # the next step averages again, with or without new gradients
        super(self.__class__, self).step()
        return loss


def _grad_hook(optimizer_ref, p: torch.Tensor) -> None:
    optimizer = optimizer_ref()
    if optimizer is not None:
        optimizer._grad_ready(p)


# id(parameter) -> (a weak reference to it, the handle of pycomm's hook on it).
_hooked = {}


def _hook_only(p: torch.Tensor, handle) -> None:
    """Makes `handle` pycomm's only hook on p, removing an earlier optimizer's."""
    key = id(p)
    earlier = _hooked.get(key)
    if earlier is not None and earlier[0]() is p:
        earlier[1].remove()
    _hooked[key] = (weakref.ref(p, lambda _, key=key: _hooked.pop(key, None)), handle)


def _assign_buckets(comm, params: list, bucket_bytes: int) -> list:
    """Parameters in reverse order (the order backward produces them), one dtype and device per
    bucket."""
    nbytes = [p.numel() * p.element_size() for p in params]
    plan = plan_buckets(nbytes, bucket_bytes, [(p.dtype, p.device) for p in params])
    return [
        _Bucket(comm, [params[i] for i in members], params[members[0]].dtype, params[members[0]].device)
        for members in plan
    ]


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters=None,
    *,
    comm=None,
    bucket_mb: float = 25.0,
    op=Average,
    backward_passes_per_step: int = 1,
):
    """Wraps `optimizer` so that step() first averages the gradients over the ranks.

    The result is an instance of a subclass of the optimizer's own class (so LR schedulers and
    isinstance checks keep working) over the same param_groups. Gradient allreduces start during
    backward, bucket by bucket (`bucket_mb` MiB each). With backward_passes_per_step=N, gradients
    accumulate locally over N backward passes (summed, as torch accumulates them) and are averaged
    over the ranks once, during the last. As in Horovod, synchronize() averages them ahead of
    step() (to clip them, say); step() then does not average again. `named_parameters` (e.g.
    model.named_parameters()) must name every parameter; errors then name them.
    """
    if isinstance(named_parameters, Communicator):  # comm passed where it used to go, second
        comm, named_parameters = named_parameters, None
    names = {}
    if named_parameters is not None:
        named = list(named_parameters)
        if len({name for name, _ in named}) != len(named):
            raise ValueError("pycomm: named_parameters holds a name twice")
        names = {p: name for name, p in named}
        unnamed = [p for group in optimizer.param_groups for p in group["params"] if p not in names]
        if unnamed:
            raise ValueError(f"pycomm: named_parameters does not name {len(unnamed)} of the optimizer's parameters")
    namespace = {k: v for k, v in _DistributedOptimizer.__dict__.items() if k not in ("__dict__", "__weakref__")}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), namespace)
    return cls(optimizer, _comm(comm), int(bucket_mb * 2**20), op, backward_passes_per_step, names)
