"""Data-parallel training of a small torch model with pycomm, as a Horovod user would write it.

    mpirun -n 2 python examples/torch/train_digits.py

Every rank trains on its shard of each global batch of scikit-learn's digits; pycomm averages the
gradients during backward. Exits non-zero unless every rank ends with bitwise identical
parameters and the held-out accuracy is above 90%.
"""

import argparse
import hashlib
import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits

import pycomm.torch as pt


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    comm = pt.init()
    rank, size = pt.rank(), pt.size()
    # The ranks on a node share its cores.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // comm.local_size))
    if args.batch % size:
        sys.exit(f"--batch {args.batch} must divide evenly over {size} ranks")

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[: len(x) // 5], order[len(x) // 5 :]

    torch.manual_seed(rank)  # different on purpose: broadcast_parameters makes them equal
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    pt.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = pt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))

    shuffle = torch.Generator().manual_seed(1)  # the same global batches on every rank
    for _ in range(args.epochs):
        epoch = train[torch.randperm(len(train), generator=shuffle)]
        for start in range(0, len(epoch) - args.batch + 1, args.batch):
            batch = epoch[start : start + args.batch]
            mine = batch[rank * args.batch // size : (rank + 1) * args.batch // size]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
            optimizer.step()

    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    digest = np.frombuffer(hashlib.blake2b(params.tobytes(), digest_size=16).digest(), np.uint8)
    identical = bool((comm.allgather(digest).reshape(size, -1) == digest).all())
    print(f"rank {rank}: held-out accuracy {accuracy:.3f}, parameters identical on all ranks: {identical}")
    return 0 if identical and accuracy > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
