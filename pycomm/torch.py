"""pycomm for PyTorch, in the shape Horovod users know.

    import pycomm.torch as pt
    pt.init()                                            # over MPI.COMM_WORLD
    pt.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    pt.broadcast_optimizer_state(optimizer, root_rank=0)  # after rank 0 loaded a checkpoint
    loss.backward(); optimizer.step()                    # gradients averaged over the ranks

Also as in Horovod: allreduce / allreduce_ (in place), allgather, broadcast / broadcast_,
broadcast_object.

CPU tensors go through the engine as zero-copy views, CUDA tensors through the device path (a
CUDA parameter's bucket lives on its GPU).
DistributedOptimizer copies each gradient into a fused bucket as soon as autograd has
accumulated it; a bucket's averaging allreduce starts once all its gradients are in, so
communication overlaps the rest of backward. Buckets live in the communicator's shared segment
where the node has one, and start in the same order on every rank.
"""

import pickle
import threading

import numpy as np
import torch

from .bucketing import plan_buckets
from .communicator import Communicator

_default = None


def init(comm=None, **settings) -> Communicator:
    """Creates the module's communicator (collective); later calls return the same one."""
    global _default
    if _default is None:
        _default = Communicator(comm, **settings)
    return _default


def _comm(comm) -> Communicator:
    return comm if comm is not None else init()


def rank() -> int:
    return init().rank


def size() -> int:
    return init().size


def local_rank() -> int:
    return init().local_rank


def allreduce(tensor: torch.Tensor, op="avg", comm=None) -> torch.Tensor:
    """A new tensor: `tensor` reduced over the ranks (average by default, as in Horovod)."""
    return _comm(comm).allreduce(tensor.detach(), op=op)


def allreduce_(tensor: torch.Tensor, op="avg", comm=None) -> torch.Tensor:
    """Reduces `tensor` over the ranks in place (average by default) and returns it."""
    _comm(comm).allreduce(tensor.detach(), op=op, out=tensor.detach())
    return tensor


def allgather(tensor: torch.Tensor, comm=None) -> torch.Tensor:
    """A new tensor: every rank's `tensor` concatenated along dimension 0, in rank order. Every
    rank's must have the same shape (unlike Horovod's, whose first dimensions may differ)."""
    return _comm(comm).allgather(tensor.detach().contiguous())


def broadcast(tensor: torch.Tensor, root_rank: int = 0, comm=None) -> torch.Tensor:
    """A new tensor holding root_rank's `tensor`; `tensor` itself is left as it was."""
    return _comm(comm).broadcast(tensor.detach().clone(memory_format=torch.contiguous_format), root=root_rank)


def broadcast_(tensor: torch.Tensor, root_rank: int = 0, comm=None) -> torch.Tensor:
    """Overwrites `tensor` with root_rank's, in place, and returns it."""
    with torch.no_grad():
        if tensor.is_contiguous():
            _comm(comm).broadcast(tensor.detach(), root=root_rank)
        else:
            tensor.copy_(_comm(comm).broadcast(tensor.detach().contiguous(), root=root_rank))
    return tensor


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


def broadcast_object(obj, root_rank: int = 0, comm=None):
    """root_rank's `obj` on every rank (pickled there; `obj` is ignored elsewhere). Through
    pycomm's own broadcast, so a rank that never comes gives an error, not a hang."""
    comm = _comm(comm)
    mine = comm.rank == root_rank
    payload = np.frombuffer(bytearray(pickle.dumps(obj)), np.uint8) if mine else None
    length = np.array([payload.size if mine else 0], np.int64)
    comm.broadcast(length, root=root_rank)
    data = comm.broadcast(payload if mine else np.empty(int(length[0]), np.uint8), root=root_rank)
    return obj if mine else pickle.loads(data.tobytes())


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
    def __init__(self, params, comm, bucket_bytes: int, op):
        super(self.__class__, self).__init__(params)
        self._pycomm = comm
        self._op = op
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("pycomm: a parameter appears twice in the optimizer's param_groups")
        self._buckets = _assign_buckets(comm, params, bucket_bytes)
        self._bucket_of = {p: b for b in self._buckets for p in b.params}
        self._next = 0
        # Autograd runs the hooks of CPU and of each GPU's gradients on threads of their own:
        # which buckets are ready, and which have started, change under this lock only.
        self._lock = threading.Lock()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[p]
        if p not in bucket.pending:
            raise RuntimeError(
                "pycomm: a gradient was accumulated twice before step(); call step() (or synchronize()) "
                "after each backward"
            )
        bucket.views[p].copy_(p.grad)
        with self._lock:
            bucket.pending.discard(p)
            self._start_ready()

    def _start_ready(self) -> None:
        # Strictly in bucket order, whatever order autograd finished them in: every rank then
        # issues the same allreduces in the same order.
        while self._next < len(self._buckets) and not self._buckets[self._next].pending:
            bucket = self._buckets[self._next]
            bucket.work = self._pycomm.allreduce_async(bucket.buffer, op=self._op, out=bucket.buffer)
            self._next += 1

    def synchronize(self) -> None:
        """Waits for every bucket and writes the averaged gradients back into p.grad. Parameters
        that got no gradient this step count as zero (on every rank)."""
        with self._lock:
            for bucket in self._buckets:
                for p in list(bucket.pending):
                    bucket.views[p].zero_()
                    bucket.pending.discard(p)
            self._start_ready()
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.work = None
            for p, view in bucket.views.items():
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
            bucket.pending = set(bucket.params)
        self._next = 0

    def step(self, closure=None):
        self.synchronize()
        return super(self.__class__, self).step(closure)


def _assign_buckets(comm, params: list, bucket_bytes: int) -> list:
    """Parameters in reverse order (the order backward produces them), one dtype and device per
    bucket."""
    nbytes = [p.numel() * p.element_size() for p in params]
    plan = plan_buckets(nbytes, bucket_bytes, [(p.dtype, p.device) for p in params])
    return [
        _Bucket(comm, [params[i] for i in members], params[members[0]].dtype, params[members[0]].device)
        for members in plan
    ]


def DistributedOptimizer(optimizer: torch.optim.Optimizer, comm=None, bucket_mb: float = 25.0, op="avg"):
    """Wraps `optimizer` so that step() first averages the gradients over the ranks.

    The result is an instance of a subclass of the optimizer's own class (so LR schedulers and
    isinstance checks keep working) over the same param_groups. Gradient allreduces start during
    backward, bucket by bucket (`bucket_mb` MiB each).
    """
    namespace = {k: v for k, v in _DistributedOptimizer.__dict__.items() if k not in ("__dict__", "__weakref__")}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), namespace)
    return cls(optimizer.param_groups, _comm(comm), int(bucket_mb * 2**20), op)
