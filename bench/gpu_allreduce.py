"""GPU allreduce benchmark: ranks sharing one GPU, torch CUDA tensors, float32 sum.

    mpirun -n 2 python bench/gpu_allreduce.py [--json PATH]

For each size it prints the time per call (slowest rank, median of repeats), busbw, and the
efficiency against the HBM floor: every rank's input read once and output written once at the
device-to-device copy bandwidth measured in the same run. Its gpu(us) column is rank 0's GPU time
for one call, the hand-offs between ranks left out: with the leader's work (ranks sharing a GPU),
time(us) - gpu(us) is what the hand-offs cost, and floor(us) / gpu(us) is how well the kernel does
on the peers' mapped buffers. It is not measured ("n/a") where rank 0's call waits for its own GPU
work (split work under host sync; through the host across nodes). At 64 MiB it also times the way
a GPU-unaware code would do it (copy to host, MPI_Allreduce, copy back) for the ratio.
"""

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

import pycomm

world = MPI.COMM_WORLD


def timed(call, iters: int) -> float:
    """Seconds per call on the slowest rank, GPU work included."""
    torch.cuda.synchronize()
    world.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    return world.allreduce((time.perf_counter() - start) / iters, op=MPI.MAX)


def median_time(call, iters: int, repeats: int = 5) -> float:
    call()
    return statistics.median(timed(call, iters) for _ in range(repeats))


def host_time(call) -> float:
    """Seconds one call keeps the calling thread (the GPU idle before it), slowest rank, median of 9."""
    samples = []
    for _ in range(9):
        torch.cuda.synchronize()
        world.Barrier()
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return world.allreduce(statistics.median(samples), op=MPI.MAX)


def gpu_time(call, repeats: int = 5) -> float:
    """Seconds of rank 0's GPU time for one call (median of `repeats`), or NaN where it was not
    measured. A sleep kernel queued first holds rank 0's stream until the call has queued its work,
    so the events around the call time that work alone, not the hand-offs between ranks. With the
    leader's work the peers queue no kernels meanwhile (with split work rank 0's stream also waits
    for theirs). Only rank 0 touches events; every rank makes the same collective calls whatever
    happens there, so a failure cannot leave the others waiting."""
    if not hasattr(torch.cuda, "_sleep"):
        return float("nan")
    samples, problem = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        world.Barrier()
        if world.rank == 0 and problem is None:
            try:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(10_000_000)  # 5 ms at 2 GHz: far longer than the hand-offs
                start.record()
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
        call()
        if world.rank == 0 and problem is None:
            try:
                if start.query():  # the sleep ended before the call had queued its work
                    problem = "the call waited for its own GPU work (as through the host), or the sleep is short"
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) * 1e-3)  # milliseconds
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
        torch.cuda.synchronize()
    if world.rank == 0 and problem is not None and problem not in gpu_time.told:
        gpu_time.told.add(problem)
        print(f"# gpu(us) not measured: {problem}", flush=True)
    return world.bcast(statistics.median(samples) if world.rank == 0 and problem is None else float("nan"))


gpu_time.told = set()  # each reason is printed once


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MiB device-to-device copy, every rank copying at once
    as the ranks of an allreduce do."""
    a = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), 20)
    return world.size * 2 * a.numel() * 4 / t


def latency_breakdown(comm) -> dict:
    """Where the time of an 8-byte allreduce goes: microseconds per call, slowest rank, each part
    timed alone in a loop of its own."""
    from pycomm import device_arrays
    from pycomm.dtypes import dtype_code

    x = torch.ones(2, device="cuda")
    on_host = np.ones(2, np.float32)
    stream = torch.cuda.current_stream()
    done = torch.cuda.Event()

    def kernel_then_poll():
        # A peer's wait for the leader's `done`: polling an event, not blocking in the driver.
        x.add_(0)
        done.record()
        while not done.query():
            pass

    d = device_arrays.describe(x)
    handle = device_arrays.stream_handle(d, None)
    code = dtype_code(d.dtype)
    parts = {
        "pycomm allreduce, in place (the whole call)": lambda: comm.allreduce(x, out=x),
        "  the core's call alone (no Python checks)": lambda: comm._native.allreduce_device(
            d.ptr, d.ptr, 2, code, 0, d.device, handle
        ),
        "  Python: reading the tensor (in-place fast path)": lambda: device_arrays.plain_in_place(x),
        "  Python: describe + stream handle (other calls)": lambda: device_arrays.stream_handle(
            device_arrays.describe(x), None
        ),
        "for scale: torch kernel + stream sync": lambda: (x.add_(0), stream.synchronize()),
        "for scale: torch kernel + event polled": kernel_then_poll,
        "for scale: empty stream sync": stream.synchronize,
        "for scale: pycomm 8 B host allreduce (hand-offs)": lambda: comm.allreduce(on_host, out=on_host),
    }
    out = {name.strip(): median_time(call, 500) * 1e6 for name, call in parts.items()}
    if world.rank == 0:
        print("# latency breakdown at 8 B (us per call, slowest rank):")
        for name in parts:
            print(f"#   {name:<50} {out[name.strip()]:8.1f}")
    out["phases"] = phase_breakdown(comm, x)
    return out


def phase_breakdown(comm, x, calls: int = 500) -> dict:
    """Host microseconds per call in each phase of an in-place allreduce of `x`, on every rank
    (the core's phase timing): where the hand-offs' time goes. Phases are summed per role, each
    over the calls that entered it; the rest of a call (Python, the bindings, the core's checks,
    a peer's stage-out, giving the caller back its GPU) is in none."""
    from pycomm._native import _core

    comm.allreduce(x, out=x)
    torch.cuda.synchronize()
    world.Barrier()
    _core.set_phase_timing(True)
    for _ in range(calls):
        comm.allreduce(x, out=x)
    _core.set_phase_timing(False)
    torch.cuda.synchronize()
    mine = {phase: seconds / laps * 1e6 for phase, seconds, laps in _core.phase_times()}
    everyone = world.gather(mine)
    if world.rank != 0:
        return {}
    names = list(dict.fromkeys(name for ranks in everyone for name in ranks))
    print(f"# phases of an 8 B allreduce in place (host us per call, {calls} calls):")
    print("#   " + f"{'phase':<48}" + "".join(f"{'rank ' + str(r):>9}" for r in range(world.size)))
    for name in names:
        cells = "".join(f"{ranks[name]:9.2f}" if name in ranks else f"{'-':>9}" for ranks in everyone)
        print(f"#   {name:<48}{cells}")
    return {f"rank {r}": ranks for r, ranks in enumerate(everyone)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--max-bytes", type=int, default=256 << 20)
    args = parser.parse_args()
    torch.cuda.set_device(0)
    P = world.size
    comm = pycomm.Communicator()
    hbm = copy_bandwidth()
    rows = []
    if world.rank == 0:
        sync = os.environ.get("PYCOMM_GPU_SYNC") or "auto"
        work = os.environ.get("PYCOMM_GPU_WORK") or "auto"
        name = torch.cuda.get_device_name(0)
        per_node = os.environ.get("PYCOMM_RANKS_PER_NODE")
        nodes = f", simulated nodes of {per_node} rank(s) (the floor is one node's)" if per_node else ""
        print(f"# pycomm GPU allreduce: P={P} ranks on {name}, float32 sum, in place, sync={sync}, work={work}{nodes}")
        print(f"# device-to-device copy, all ranks at once: {hbm / 1e9:.0f} GB/s (bytes read + written)")
        print(
            f"{'size(B)':>12} {'time(us)':>10} {'host(us)':>9} {'gpu(us)':>9} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} "
            f"{'floor(us)':>10} {'eff':>6}"
        )
    size = 8
    while size <= args.max_bytes:
        x = torch.full((size // 4,), float(world.rank + 1), device="cuda")
        iters = 200 if size <= (1 << 20) else 20
        t = median_time(lambda x=x: comm.allreduce(x, out=x), iters)
        t_host = host_time(lambda x=x: comm.allreduce(x, out=x))
        t_gpu = gpu_time(lambda x=x: comm.allreduce(x, out=x))
        floor = 2 * P * size / hbm
        row = {"bytes": size, "time_us": t * 1e6, "algbw": size / t / 1e9, "busbw": size / t / 1e9 * 2 * (P - 1) / P}
        gpu_us = None if math.isnan(t_gpu) else t_gpu * 1e6  # JSON has no NaN
        row.update(host_us=t_host * 1e6, gpu_us=gpu_us, floor_us=floor * 1e6, efficiency=floor / t)
        rows.append(row)
        if world.rank == 0:
            print(
                f"{size:>12} {row['time_us']:>10.1f} {row['host_us']:>9.1f} "
                f"{'n/a' if gpu_us is None else format(gpu_us, '.1f'):>9} "
                f"{row['algbw']:>12.2f} {row['busbw']:>12.2f} {row['floor_us']:>10.1f} {row['efficiency']:>6.2f}"
            )
        size *= 4 if size < (32 << 10) else 2  # 8 B-32 KiB by 4, then every power of 2: 64 KiB (the target's edge) too
    staged = None
    if args.max_bytes >= 64 << 20:
        x = torch.ones(16 << 20, device="cuda")
        host = np.empty(16 << 20, np.float32)

        def through_host():
            host[...] = x.cpu().numpy()
            world.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
            x.copy_(torch.from_numpy(host))

        t_host = median_time(through_host, 5, 3)
        t_pycomm = median_time(lambda: comm.allreduce(x, out=x), 20)
        staged = {"bytes": 64 << 20, "host_mpi_us": t_host * 1e6, "pycomm_us": t_pycomm * 1e6}
        staged["ratio"] = t_host / t_pycomm
        if world.rank == 0:
            print(
                f"# 64 MiB: host staging + MPI_Allreduce {t_host * 1e6:.0f} us, pycomm {t_pycomm * 1e6:.0f} us, "
                f"ratio {t_host / t_pycomm:.1f}x"
            )
    latency = latency_breakdown(comm)
    comm.close()
    if world.rank == 0 and args.json:
        meta = {"P": P, "device": torch.cuda.get_device_name(0), "copy_GBps": hbm / 1e9, "date": time.strftime("%F")}
        meta["sync"] = os.environ.get("PYCOMM_GPU_SYNC") or "auto"
        meta["work"] = os.environ.get("PYCOMM_GPU_WORK") or "auto"
        meta["ranks_per_node"] = os.environ.get("PYCOMM_RANKS_PER_NODE")
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "host_staging_64MiB": staged, "latency_8B": latency}, f, indent=1)


if __name__ == "__main__":
    main()
