"""pycomm.torch under mpirun: broadcast_parameters, DistributedOptimizer, CPU tensors in the API."""

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
    for p, g in zip(model.parameters(), local):
        everyone = [t.numpy() for t in comm.allgather(g.unsqueeze(0).contiguous())]
        f.check(matches(p.grad.numpy(), everyone, np.dtype(np.float32), "avg"), f"step {step}: averaged gradient")
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
    f.check("accumulated twice before step()" in str(e), f"second backward: {e}")
opt.synchronize()
f.finish()
