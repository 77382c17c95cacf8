"""Checks the cost model of the hierarchical allreduce (docs/algorithms.md) against a run.

    PYCOMM_RANKS_PER_NODE=2 MPIR_CVAR_NOLOCAL=1 mpirun -n 4 python bench/hierarchical_model.py

Measures, in the same run, what the model takes as input:
- the link between nodes: latency (half a round trip of 8 bytes) and bandwidth (every local rank
  exchanging 16 MiB with its peer on the other node at once, so that the figure is per node, as a
  node's network card would be shared);
- the memory of a node: every local rank copying 64 MiB at once (bytes read + written per second);
- the latency of a round through shared memory (a pycomm one-node 8-byte allreduce's time over
  the node's ranks, which is one such round);
then times pycomm's hierarchical allreduce and the flat ring, and prints measured against
predicted busbw. Ranks 0 and 1 of each node pair up across nodes 0 and 1 (2 nodes or more).
"""

import argparse
import json
import statistics

import numpy as np
from mpi4py import MPI

import pycomm
from pycomm.bench import node_memory_bandwidth, time_calls

world = MPI.COMM_WORLD
P, RANK = world.size, world.rank


def median_time(fn, iters: int, repeats: int = 5, comm=world) -> float:
    return statistics.median(time_calls(fn, iters, comm) for _ in range(repeats))


def layout():
    """(node communicator, local rank, local size, node count) from pycomm's grouping."""
    comm = pycomm.Communicator()
    local_rank, local_size = comm.local_rank, comm.local_size
    comm.close()
    node = world.Split(RANK - local_rank, RANK)  # node leaders' ranks tell the nodes apart
    nodes = world.allreduce(1 if local_rank == 0 else 0)
    return node, local_rank, local_size, nodes


def measure_link(local_rank, local_size):
    """Latency (s) and per-node bandwidth (bytes/s) between node 0 and node 1."""
    peer = RANK + local_size if RANK < local_size else RANK - local_size
    active = RANK < 2 * local_size

    def exchange(buf, out):
        if active:
            world.Sendrecv(buf, dest=peer, recvbuf=out, source=peer)

    small, small_out = np.zeros(1, np.float64), np.zeros(1, np.float64)
    # Only the first pair, alone: the latency of one message.
    alpha = median_time(lambda: world.Sendrecv(small, dest=peer, recvbuf=small_out, source=peer), 200) if active else 0
    alpha = world.bcast(alpha if RANK == 0 else None, root=0)
    big = np.ones(16 << 20, np.uint8)
    big_out = np.empty_like(big)
    seconds = median_time(lambda: exchange(big, big_out), 5)
    return alpha, local_size * big.nbytes / seconds


def predict_hierarchical(n, p, shared_cpu: bool) -> float:
    """Seconds for an n-byte hierarchical allreduce; `shared_cpu`: the nodes are simulated on one
    machine, so the memory stage and the network stage take turns on the same cores (sum) rather
    than overlapping (max)."""
    L, N = p["local_size"], p["nodes"]
    memory = L * (5 + 1 / L) * n / p["memory_bw"]  # node's bytes of copies and reductions
    network = 2 * (N - 1) / N * n / p["link_bw"]  # bytes through each node's link
    slices = 1 if n <= (64 << 10) else L
    latency = 2 * p["round_s"] + 2 * (N - 1) * p["link_alpha"] * slices / L
    if shared_cpu:
        return latency + memory + network
    return latency + max(memory, network)


def predict_flat_ring(n, p, shared_cpu: bool) -> float:
    """Seconds for the flat ring over MPI: 2(P-1) dependent steps of 2(P-1)/P n bytes per rank.
    Simulated (MPIR_CVAR_NOLOCAL), every hop goes through the network stack, so a node's L ranks
    all send through its link, and the reductions take their turn on the same cores; on a real
    cluster only one hop per node leaves it."""
    per_rank = 2 * (P - 1) / P * n
    latency = 2 * (P - 1) * p["link_alpha"]
    if shared_cpu:
        reduce = p["local_size"] * 3 * (P - 1) / P * n / p["memory_bw"]  # read 2, write 1 per element
        return latency + p["local_size"] * per_rank / p["link_bw"] + reduce
    return latency + per_rank / p["link_bw"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64K,1M,4M,16M,64M")
    parser.add_argument("--json", help="write the parameters and rows here")
    parser.add_argument("--real-cluster", action="store_true", help="nodes are separate machines (overlap: max)")
    args = parser.parse_args()
    node, local_rank, local_size, nodes = layout()
    alpha, link_bw = measure_link(local_rank, local_size)
    memory_bw = world.bcast(node_memory_bandwidth(node), root=0)
    one_node = pycomm.Communicator(node) if node.size > 1 else None
    x8 = np.ones(2, np.float32)
    round_s = median_time(lambda: one_node.allreduce(x8, out=x8), 500) if one_node else 0.0
    round_s = world.bcast(round_s, root=0)
    params = {
        "P": P,
        "nodes": nodes,
        "local_size": local_size,
        "link_alpha": alpha,
        "link_bw": link_bw,
        "memory_bw": memory_bw,
        "round_s": round_s,
    }
    shared_cpu = not args.real_cluster
    hier = pycomm.Communicator(algorithm="hierarchical")
    ring = pycomm.Communicator(algorithm="ring")
    rows = []
    if RANK == 0:
        print(
            f"# P={P}, {nodes} nodes x {local_size}: link {alpha * 1e6:.1f} us, {link_bw / 1e9:.2f} GB/s per node; "
            f"memory {memory_bw / 1e9:.1f} GB/s per node; shared-memory round {round_s * 1e6:.1f} us"
        )
        print(f"# {'size':>10} {'hier busbw':>11} {'predicted':>10} {'ring busbw':>11} {'predicted':>10}  (GB/s)")
    factor = 2 * (P - 1) / P
    for text in args.sizes.split(","):
        n = pycomm.settings.parse_size(text)
        x = np.ones(n // 4, np.float32)
        y = np.empty_like(x)
        iters = max(3, min(200, int(2e8 / max(n, 1))))
        measured = {}
        for name, comm in (("hier", hier), ("ring", ring)):
            comm.allreduce(x, out=y)
            measured[name] = median_time(lambda comm=comm, x=x, y=y: comm.allreduce(x, out=y), iters)
        row = {
            "bytes": n,
            "hier_busbw": n / measured["hier"] * factor / 1e9,
            "hier_predicted": n / predict_hierarchical(n, params, shared_cpu) * factor / 1e9,
            "ring_busbw": n / measured["ring"] * factor / 1e9,
            "ring_predicted": n / predict_flat_ring(n, params, shared_cpu) * factor / 1e9,
        }
        rows.append(row)
        if RANK == 0:
            print(
                f"  {n:>10} {row['hier_busbw']:>11.3f} {row['hier_predicted']:>10.3f} "
                f"{row['ring_busbw']:>11.3f} {row['ring_predicted']:>10.3f}",
                flush=True,
            )
    for comm in (hier, ring, one_node):
        if comm:
            comm.close()
    if RANK == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": params, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
