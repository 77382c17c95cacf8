"""pycomm.torch under mpirun: broadcast_parameters, DistributedOptimizer, CPU tensors in the API."""

import contextlib
import sys

import numpy as np
import torch
from common import Failures, matches, same_on_all_ranks
from mpi4py import MPI

import pycomm.torch as pt

bucket_mb = float(sys.argv[1])
torch.set_num_threads(1)
rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
f = Failures()
comm = pt.init()
f.check(pt.rank() == rank and pt.size() == size, "rank()/size()")


def model_with_seed(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5))


def flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()


def averaged_over_ranks(model, local) -> bool:
    """Whether every parameter's gradient is the average of every rank's `local` one."""
    ok = True
    for p, g in zip(model.parameters(), local):
        everyone = [t.numpy() for t in comm.allgather(g.unsqueeze(0).contiguous())]
        ok = ok and matches(p.grad.numpy(), everyone, np.dtype(np.float32), "avg")
    return ok


def backward(model, gen, rows=16):
    x, target = torch.randn(rows, 7, generator=gen), torch.randint(0, 5, (rows,), generator=gen)
    torch.nn.functional.cross_entropy(model(x), target).backward()


# broadcast_parameters: ranks start different; afterwards all hold rank 0's values.
model = model_with_seed(100 + rank)
pt.broadcast_parameters(model.state_dict(), root_rank=0)
f.check(np.array_equal(flat(model.parameters()), flat(model_with_seed(100).parameters())), "broadcast_parameters")
pt.broadcast_parameters(list(model.named_parameters()), root_rank=size - 1)  # named_parameters() form
f.check(same_on_all_ranks(flat(model.parameters())), "broadcast_parameters from the last rank")

# CPU tensors in the plain API: results stay tensors, in place works, bfloat16 too.
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int32):
    x = (torch.arange(1000) % 17 + rank).to(dtype)
    y = pt.allreduce(x, op="sum")
    inputs = [(np.arange(1000) % 17 + r).astype(np.float64) for r in range(size)]
    f.check(isinstance(y, torch.Tensor) and y.dtype == dtype, f"allreduce returns a {dtype} tensor")
    f.check(matches(y.double().numpy(), inputs, np.dtype(np.float64), "sum"), f"allreduce sum {dtype}")
    comm.allreduce(x, op="max", out=x)
    f.check(int(x.double().max()) == 16 + size - 1, f"in-place max {dtype}")

# DistributedOptimizer: the gradients step() uses are the average of every rank's gradients.
model = model_with_seed(7)
base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
opt = pt.DistributedOptimizer(base, bucket_mb=bucket_mb)
f.check(isinstance(opt, torch.optim.SGD), "DistributedOptimizer is still an SGD")
scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
gen = torch.Generator().manual_seed(rank)
for step in range(4):
    x, target = torch.randn(16, 7, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), target).backward()
    local = [p.grad.detach().clone() for p in model.parameters()]
    opt.synchronize()
    f.check(averaged_over_ranks(model, local), f"step {step}: averaged gradient")
    opt.step()
    scheduler.step()
    f.check(same_on_all_ranks(flat(model.parameters())), f"step {step}: identical parameters")
f.check(abs(opt.param_groups[0]["lr"] - 0.0125) < 1e-12, "the LR scheduler drives the wrapped optimizer")

# A parameter that gets no gradient this step counts as zero on every rank.
extra = torch.nn.Parameter(torch.ones(3))
model = model_with_seed(8)
opt = pt.DistributedOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=0.1), bucket_mb=bucket_mb)
opt.zero_grad()
model(torch.randn(4, 7)).sum().backward()
opt.step()
f.check(torch.equal(extra.grad, torch.zeros(3)) and torch.equal(extra.detach(), torch.ones(3)), "unused parameter")

# Two backward passes without a step in between: a clear error, not a silent race.
opt.zero_grad()
model(torch.randn(4, 7)).sum().backward()
try:
    model(torch.randn(4, 7)).sum().backward()
    f.check(False, "second backward before step() must raise")
except RuntimeError as e:
    f.check("more than backward_passes_per_step=1" in str(e), f"second backward: {e}")
opt.synchronize()

# Horovod's gradient clipping: synchronize(), clip the averaged gradients, then step() (plain, or
# inside skip_synchronize()) applies the clipped ones: it must not average again, nor zero them.
model = model_with_seed(9)
opt = pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), bucket_mb=bucket_mb)
gen = torch.Generator().manual_seed(50 + rank)
for skip in (False, True):
    opt.zero_grad()
    backward(model, gen)
    local = [p.grad.detach().clone() for p in model.parameters()]
    opt.synchronize()
    opt.synchronize()  # a second call changes nothing
    f.check(averaged_over_ranks(model, local), f"clipping (skip={skip}): averaged gradient")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    clipped = [p.grad.detach().clone() for p in model.parameters()]
    before = flat(model.parameters())
    with opt.skip_synchronize() if skip else contextlib.nullcontext():
        opt.step()
    f.check(
        all(torch.equal(p.grad, c) for p, c in zip(model.parameters(), clipped)), f"clipped gradients kept ({skip})"
    )
    moved = before - 0.1 * flat(clipped)
    f.check(
        np.allclose(flat(model.parameters()), moved, rtol=0, atol=1e-6), f"step applies the clipped gradients ({skip})"
    )
    f.check(same_on_all_ranks(flat(model.parameters())), f"clipping (skip={skip}): identical parameters")

# backward_passes_per_step: gradients summed locally over the passes, averaged once over the ranks.
model = model_with_seed(10)
opt = pt.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1), bucket_mb=bucket_mb, backward_passes_per_step=2
)
opt.zero_grad()
backward(model, gen, rows=5)
backward(model, gen, rows=3)
local = [p.grad.detach().clone() for p in model.parameters()]  # both passes' sum
opt.step()
f.check(averaged_over_ranks(model, local), "two passes per step: averaged sum")
f.check(same_on_all_ranks(flat(model.parameters())), "two passes per step: identical parameters")
opt.zero_grad()
backward(model, gen)
backward(model, gen)
try:
    backward(model, gen)
    f.check(False, "a third pass of two must raise")
except RuntimeError as e:
    f.check("more than backward_passes_per_step=2" in str(e), f"third pass: {e}")
opt.synchronize()
opt.zero_grad()
backward(model, gen)  # fewer passes than expected: what there is counts
local = [p.grad.detach().clone() for p in model.parameters()]
opt.step()
f.check(averaged_over_ranks(model, local), "one pass of two: averaged")
try:
    pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backward_passes_per_step=0)
    f.check(False, "backward_passes_per_step=0 must raise")
except ValueError:
    pass

# A parameter only rank 0 uses, then a collective of the caller's between backward and step:
# every rank has started all of its gradient allreduces by the end of backward, so the
# caller's allreduce pairs with the caller's, not with a gradient bucket.
used, branch = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
opt = pt.DistributedOptimizer(torch.optim.SGD([used, branch], lr=1.0), bucket_mb=bucket_mb)
for _ in range(2):
    opt.zero_grad()
    loss = (used * (rank + 1)).sum() + ((branch * 10).sum() if rank == 0 else 0)
    loss.backward()
    metric = pt.allreduce(torch.full((8,), 100.0 * (rank + 1)), op=pt.Sum, name="metric")
    opt.step()
    f.check(torch.equal(metric, torch.full((8,), 50.0 * size * (size + 1))), f"caller's allreduce: {metric.tolist()}")
    f.check(torch.equal(used.grad, torch.full((4,), (size + 1) / 2)), f"used: {used.grad.tolist()}")
    f.check(torch.equal(branch.grad, torch.full((4,), 10 / size)), f"rank 0's branch: {branch.grad.tolist()}")

# Gradients that no hook sees (assigned by hand, or a second step() after one backward) are
# averaged as p.grad holds them, as Horovod does; step(closure) averages the closure's.
p0 = torch.nn.Parameter(torch.zeros(3))
opt = pt.DistributedOptimizer(torch.optim.SGD([p0], lr=1.0), named_parameters=[("p0", p0)])
(g,) = torch.autograd.grad((p0 * (rank + 1)).sum(), [p0])
p0.grad = g
opt.step()
f.check(torch.equal(p0.grad, torch.full((3,), (size + 1) / 2)), f"assigned gradient: {p0.grad.tolist()}")
opt.step()
f.check(torch.equal(p0.detach(), torch.full((3,), -(size + 1.0))), f"second step, same gradient: {p0.tolist()}")


def closure():
    opt.zero_grad()
    loss = (p0 * (rank + 1)).sum()
    loss.backward()
    return loss


f.check(opt.step(closure).item() == -3 * (size + 1) * (rank + 1), "step(closure) returns the closure's loss")
f.check(torch.equal(p0.detach(), torch.full((3,), -1.5 * (size + 1))), f"step(closure): {p0.tolist()}")

# add_param_group after wrapping: the group takes the wrapped optimizer's defaults, and its
# gradients are averaged; a parameter unfrozen after wrapping is refused, not left unaveraged.
a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
opt = pt.DistributedOptimizer(torch.optim.SGD([a], lr=1.0, momentum=0.9), bucket_mb=bucket_mb)
opt.add_param_group({"params": [b]})
((a + b) * (rank + 1)).sum().backward()
opt.step()
f.check(opt.param_groups[1]["lr"] == 1.0 and opt.param_groups[1]["momentum"] == 0.9, "add_param_group defaults")
f.check(torch.equal(b.grad, torch.full((2,), (size + 1) / 2)), f"added group averaged: {b.grad.tolist()}")
frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
opt = pt.DistributedOptimizer(torch.optim.SGD([a, frozen], lr=1.0), named_parameters=[("a", a), ("frozen", frozen)])
frozen.requires_grad_(True)
opt.zero_grad()
(a + frozen).sum().backward()
try:
    opt.step()
    f.check(False, "a parameter unfrozen after wrapping must be refused")
except RuntimeError as e:
    f.check("frozen has a gradient but did not require one" in str(e), f"unfrozen: {e}")
try:
    opt.zero_grad()
    f.check(False, "zero_grad() between backward and step must raise")
except RuntimeError as e:
    f.check("call optimizer.synchronize() first" in str(e), f"zero_grad between: {e}")

# A second optimizer over the same model trains, whether the first is gone or still held (its
# hooks go either way); sparse gradients are averaged as dense ones.
model = model_with_seed(12)
held = []
for lr in (0.1, 0.01, 0.001):
    opt = pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), comm, bucket_mb=bucket_mb)
    held += [opt] if lr == 0.01 else []
    for _ in range(2):
        opt.zero_grad()
        backward(model, gen)
        opt.step()
f.check(same_on_all_ranks(flat(model.parameters())), "a second DistributedOptimizer over one model")

# One optimizer over two models whose losses go through backward() separately (actor and
# critic), and a model with reentrant checkpointing: each parameter's gradient arrives once.
actor, critic = model_with_seed(13), model_with_seed(14)
opt = pt.DistributedOptimizer(torch.optim.SGD([*actor.parameters(), *critic.parameters()], lr=0.1))
for _ in range(2):
    opt.zero_grad()
    backward(actor, gen)
    backward(critic, gen)
    local = [p.grad.detach().clone() for p in [*actor.parameters(), *critic.parameters()]]
    opt.synchronize()
    f.check(averaged_over_ranks(torch.nn.ModuleList([actor, critic]), local), "two backward() calls per step")
    opt.step()
first, last = torch.nn.Linear(7, 7), torch.nn.Linear(7, 5)
opt = pt.DistributedOptimizer(torch.optim.SGD([*first.parameters(), *last.parameters()], lr=0.1))
x = torch.randn(4, 7, generator=gen)
torch.utils.checkpoint.checkpoint(last, first(x), use_reentrant=True).sum().backward()
local = [p.grad.detach().clone() for p in [*first.parameters(), *last.parameters()]]
opt.step()
f.check(averaged_over_ranks(torch.nn.ModuleList([first, last]), local), "reentrant checkpoint")

# A parameter frozen at wrapping that keeps a zero gradient (zero_grad(set_to_none=False)) is fine.
a, frozen = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)
frozen.grad = torch.zeros(2)
opt = pt.DistributedOptimizer(torch.optim.SGD([a, frozen], lr=1.0))
opt.zero_grad(set_to_none=False)
(a * (rank + 1)).sum().backward()
opt.step()
f.check(torch.equal(a.grad, torch.full((2,), (size + 1) / 2)), f"a frozen parameter with a zero gradient: {a.grad}")
emb = torch.nn.Embedding(6, 2, sparse=True)
opt = pt.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=1.0))
emb(torch.tensor([rank % 6])).sum().backward()
opt.step()
want = torch.zeros(6, 2)
for r in range(size):
    want[r % 6] += 1 / size
f.check(torch.equal(emb.weight.grad, want), f"sparse gradient: {emb.weight.grad.tolist()}")
for bad in (dict(named_parameters=[("w", a)]), dict(named_parameters=[("w", a), ("w", b)]), dict(comm="world")):
    try:
        pt.DistributedOptimizer(torch.optim.SGD([a, b], lr=1.0), **bad)
        f.check(False, f"{bad} must be refused")
    except (ValueError, TypeError):
        pass

# Horovod's other calls: in place, gather, broadcast of tensors and of objects.
x = torch.full((4,), float(rank + 1))
f.check(pt.allreduce_(x, op="sum") is x and torch.equal(x, torch.full((4,), size * (size + 1) / 2)), "allreduce_")
g = pt.allgather(torch.full((2, 3), rank, dtype=torch.int64))
want = torch.arange(size).repeat_interleave(2).unsqueeze(1).expand(2 * size, 3)
f.check(g.shape == (2 * size, 3) and torch.equal(g, want), f"allgather: {g.tolist()}")
t = torch.arange(6.0).reshape(2, 3) + rank
b = pt.broadcast(t, root_rank=size - 1)
f.check(torch.equal(b, torch.arange(6.0).reshape(2, 3) + size - 1), "broadcast from the last rank")
f.check(torch.equal(t, torch.arange(6.0).reshape(2, 3) + rank), "broadcast leaves its input alone")
nc = (torch.arange(6.0).reshape(2, 3) + rank).t()  # not contiguous
f.check(pt.broadcast_(nc, root_rank=0) is nc and torch.equal(nc, torch.arange(6.0).reshape(2, 3).t()), "broadcast_")
obj = pt.broadcast_object({"rank": rank, "tensor": torch.ones(2) * rank, "text": "x" * rank}, root_rank=size - 1)
f.check(obj["rank"] == size - 1 and obj["text"] == "x" * (size - 1), f"broadcast_object: {obj}")
f.check(torch.equal(obj["tensor"], torch.ones(2) * (size - 1)), "broadcast_object's tensor")
objs = pt.allgather_object({"rank": rank, "text": "y" * (3 * rank)})
f.check(objs == [{"rank": r, "text": "y" * (3 * r)} for r in range(size)], f"allgather_object: {objs}")
pt.barrier()

# allreduce_ on a non-contiguous tensor gets the result back through a contiguous copy.
nc = (torch.arange(6.0).reshape(2, 3) + rank).t()
want = torch.arange(6.0).reshape(2, 3).t() + size - 1
f.check(pt.allreduce_(nc, op="max") is nc and torch.equal(nc, want), "allreduce_ non-contiguous")

# Horovod's async calls: handles, poll, synchronize; in place (non-contiguous too) and new.
x = torch.full((5,), float(rank))
nc = (torch.arange(6.0).reshape(2, 3) + rank).t()
handles = [pt.allreduce_async(x, op="sum"), pt.allreduce_async_(x, op="max"), pt.allreduce_async_(nc, op="min")]
y = pt.synchronize(handles[0])
f.check(pt.poll(handles[1]) in (True, False) and pt.synchronize(handles[1]) is x, "allreduce_async_ returns its tensor")
f.check(pt.synchronize(handles[2]) is nc and pt.poll(handles[2]), "synchronize of a non-contiguous tensor")
f.check(torch.equal(y, torch.full((5,), size * (size - 1) / 2)), f"allreduce_async: {y.tolist()}")
f.check(torch.equal(x, torch.full((5,), float(size - 1))), f"allreduce_async_: {x.tolist()}")
f.check(torch.equal(nc, torch.arange(6.0).reshape(2, 3).t()), f"allreduce_async_ non-contiguous: {nc.tolist()}")

# allgather: first dimensions may differ (rank r gives r rows; rank 0 none), the others may not.
g = pt.allgather(torch.full((rank, 2), rank, dtype=torch.int32))
want = torch.cat([torch.full((r, 2), r, dtype=torch.int32) for r in range(size)])
f.check(g.shape == want.shape and torch.equal(g, want), f"allgather of uneven rows: {g.tolist()}")
if size > 1:
    try:
        pt.allgather(torch.zeros(2, 3 if rank == 0 else 4))
        f.check(False, "allgather of different trailing dimensions must raise")
    except ValueError as e:
        f.check("first dimension" in str(e) and "(2, 3)" in str(e), f"allgather trailing dimensions: {e}")
    try:
        pt.allgather(torch.zeros((2,) * (1 + (rank == 0))))
        f.check(False, "allgather of different dimension counts must raise")
    except ValueError as e:
        f.check("dimensions on different ranks" in str(e), f"allgather dimension counts: {e}")
f.check(torch.equal(pt.allgather(torch.tensor([rank])), torch.arange(size)), "allgather after refused calls")

# reducescatter: Horovod's split; where rows do not divide, the first ranks get one more.
for rows in (2 * size, 2 * size + 1, size - 1):
    x = torch.arange(rows * 3, dtype=torch.float64).reshape(rows, 3) * (rank + 1)
    mine = pt.reducescatter(x, op="sum")
    counts = [rows // size + (r < rows % size) for r in range(size)]
    start = sum(counts[:rank])
    total = torch.arange(rows * 3, dtype=torch.float64).reshape(rows, 3) * (size * (size + 1) / 2)
    want = total[start : start + counts[rank]]
    f.check(mine.shape == want.shape and torch.equal(mine, want), f"reducescatter of {rows} rows: {mine.tolist()}")
avg = pt.reducescatter(torch.full((size, 2), float(rank)))
f.check(torch.equal(avg, torch.full((1, 2), (size - 1) / 2)), f"reducescatter averages by default: {avg.tolist()}")

# Differentiable collectives: gradients as for the sum of every rank's loss.
for op, scale in ((pt.Sum, 1.0), (pt.Average, 1.0 / size)):
    x = torch.ones(3, requires_grad=True)
    (pt.allreduce(x, op=op) * (rank + 1)).sum().backward()
    f.check(torch.allclose(x.grad, torch.full((3,), scale * size * (size + 1) / 2)), f"allreduce {op} grad: {x.grad}")
    rows = 2 * size + 1
    x = torch.ones(rows, 2, requires_grad=True)
    (pt.reducescatter(x, op=op) * (rank + 1)).sum().backward()
    counts = torch.tensor([rows // size + (r < rows % size) for r in range(size)])
    want = (torch.repeat_interleave(torch.arange(size), counts) + 1.0).unsqueeze(1).expand(-1, 2) * scale
    f.check(torch.allclose(x.grad, want), f"reducescatter {op} grad: {x.grad}")
# allgather: uneven rows, equal rows, scalars; row j of the result weighs j + 1 in each loss.
for name, rows in (("uneven", [r + 1 for r in range(size)]), ("equal", [2] * size), ("scalar", [1] * size)):
    x = torch.ones(() if name == "scalar" else (rows[rank], 2), requires_grad=True)
    y = pt.allgather(x * 1.0)
    weights = torch.arange(1.0, y.shape[0] + 1)
    (y * (rank + 1) * (weights if name == "scalar" else weights.unsqueeze(1))).sum().backward()
    start = sum(rows[:rank])
    want = size * (size + 1) / 2 * weights[start : start + rows[rank]]
    want = want.reshape(()) if name == "scalar" else want.unsqueeze(1).expand(-1, 2)
    f.check(y.shape[0] == sum(rows) and torch.allclose(x.grad, want), f"allgather grad, {name} rows: {x.grad}")
x = torch.full((2,), float(rank + 1), requires_grad=True)
(x / pt.allreduce(x.detach().max(), op=pt.Max)).sum().backward()  # max: a constant
f.check(torch.allclose(x.grad, torch.full((2,), 1.0 / size)), f"through a max: {x.grad}")
x = torch.ones(2, requires_grad=True)
(g,) = torch.autograd.grad(pt.allreduce(x * x, op=pt.Sum).sum(), x, create_graph=True)
g.sum().backward()
f.check(
    torch.equal(g.detach(), torch.full((2,), 2.0 * size)) and torch.equal(x.grad, torch.full((2,), 2.0 * size)),
    "double",
)

# broadcast_optimizer_state: the root has stepped (Adam's moments and step counts exist) and
# changed its learning rate; the others are fresh. Afterwards every rank holds the root's state,
# and the same steps keep the parameters identical.
root = size - 1
model = model_with_seed(11)
opt = pt.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3 * (rank + 1)), bucket_mb=bucket_mb)
if rank == root:  # loads a checkpoint: an optimizer that stepped alone, over a copy of the model
    alone = model_with_seed(11)
    local = torch.optim.Adam(alone.parameters(), lr=0.02)
    for _ in range(3):
        local.zero_grad()
        alone(torch.randn(8, 7)).sum().backward()
        local.step()
    opt.load_state_dict(local.state_dict())
pt.broadcast_parameters(model.state_dict(), root_rank=root)
pt.broadcast_optimizer_state(opt, root_rank=root)
f.check(opt.param_groups[0]["lr"] == 0.02, f"optimizer lr after broadcast: {opt.param_groups[0]['lr']}")
moments = [opt.state[p]["exp_avg"] for p in model.parameters()] if len(opt.state) else []
f.check(len(moments) == 4 and same_on_all_ranks(flat(moments)), "Adam's moments equal on every rank")
f.check(all(int(opt.state[p]["step"]) == 3 for p in model.parameters()), "Adam's step counts")
gen = torch.Generator().manual_seed(rank)
for _ in range(2):
    opt.zero_grad()
    model(torch.randn(8, 7, generator=gen)).sum().backward()
    opt.step()
f.check(same_on_all_ranks(flat(model.parameters())), "identical parameters after steps from the broadcast state")

# shutdown closes the module's communicator; init() makes a new one.
pt.shutdown()
f.check(not pt.is_initialized() and "closed" in repr(comm), "shutdown")
f.check(pt.allreduce(torch.ones(2), op="sum").tolist() == [size, size] and pt.is_initialized(), "init after shutdown")
f.check(pt.local_size() >= 1, "local_size")
f.finish()
