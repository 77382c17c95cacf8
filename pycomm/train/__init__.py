"""A thin data-parallel trainer on pycomm: `mpirun -n P python -m pycomm.train`.

Every rank holds a replica of the model and trains on its shard of each global batch; gradients
land in fused buckets (in the communicator's shared segment where there is one) whose averaging
allreduce starts as soon as the backward pass has filled them.
"""
