"""`python -m pycomm.train`: flags, the progress bar and the summary rank 0 prints."""

import argparse
import json
import os
import sys

import numpy as np

from .loop import CheckFailed, Config, Trainer


def _at_least(least: int):
    """An argparse type: a whole number not below `least`."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return read


def parse(argv=None) -> tuple:
    p = argparse.ArgumentParser(
        prog="python -m pycomm.train",
        description="Data-parallel training on pycomm: run under mpirun -n P.",
    )
    d = Config()
    p.add_argument(
        "--model",
        choices=["mlp", "linear"],
        default=d.model,
        help="mlp: classifier on scikit-learn's digits; linear: regression on its diabetes set",
    )
    p.add_argument("--width", type=_at_least(1), default=d.width, help="hidden units per layer (mlp)")
    p.add_argument("--layers", type=_at_least(0), default=d.layers, help="hidden layers (mlp)")
    p.add_argument("--batch", type=_at_least(1), default=d.batch, help="global batch, split evenly over the ranks")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--epochs", type=_at_least(1), default=d.epochs)
    p.add_argument("--steps", type=_at_least(0), default=d.steps, help="train this many steps (overrides --epochs)")
    p.add_argument("--bucket-mb", type=float, default=d.bucket_bytes / 2**20, help="gradient bucket size, MiB")
    p.add_argument("--no-overlap", action="store_true", help="start the allreduces only after backward ends")
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["cpu", "gpu"], default=d.device, help="gpu: cupy arrays, one GPU per node")
    p.add_argument(
        "--check",
        action="store_true",
        help="fail unless all ranks hold bitwise identical parameters after every step and the "
        "result matches 1-rank training with the same global batch",
    )
    p.add_argument("--check-tol", type=float, default=d.check_tol)
    p.add_argument("--checkpoint", default=d.checkpoint, metavar="PATH", help="rank 0 saves here (atomically)")
    p.add_argument("--every", type=_at_least(1), default=d.every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument(
        "--kill-at-step", type=int, default=d.kill_at_step, help="testing aid: SIGKILL every rank after N steps"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the summary here as JSON")
    p.add_argument(
        "--threads", type=_at_least(0), default=0, help="BLAS threads per rank (default: cores / ranks on the node)"
    )
    p.add_argument("--timeout", type=float, default=None, help="pycomm timeout (seconds)")
    a = p.parse_args(argv)
    if a.resume and not a.checkpoint:
        p.error("--resume needs --checkpoint")
    cfg = Config(
        model=a.model, width=a.width, layers=a.layers, batch=a.batch, lr=a.lr, momentum=a.momentum,
        epochs=a.epochs, steps=a.steps, bucket_bytes=int(a.bucket_mb * 2**20), overlap=not a.no_overlap,
        dtype=a.dtype, seed=a.seed, device=a.device, check=a.check, check_tol=a.check_tol,
        checkpoint=a.checkpoint, every=a.every, resume=a.resume, kill_at_step=a.kill_at_step,
        progress=not a.no_progress,
    )  # fmt: skip
    return cfg, a


def _array_module(device: str):
    if device == "cpu":
        return np
    import cupy

    return cupy


def _limit_blas_threads(threads: int, ranks_on_node: int) -> None:
    """Ranks on one node share its cores: BLAS threads beyond a rank's share spin against the
    other ranks (and their communication) and slow every step down many times over."""
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // ranks_on_node)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)


def summarise(trainer: Trainer, stats, result: dict, comm) -> dict:
    cfg, model = trainer.cfg, trainer.model
    samples = stats.steps * cfg.batch
    hidden = max(0.0, stats.comm_seconds - stats.wait_seconds)
    summary = {
        "model": model.describe(),
        "parameters": model.count,
        "gradient_mib": trainer.buckets.nbytes / 2**20,
        "buckets": len(trainer.buckets.buffers),
        "ranks": comm.size,
        "global_batch": cfg.batch,
        "overlap": cfg.overlap,
        "steps": stats.steps,
        "seconds": stats.seconds,
        "samples_per_s": samples / stats.seconds if stats.seconds else 0.0,
        "comm_seconds": stats.comm_seconds,
        "comm_wait_seconds": stats.wait_seconds,
        "comm_hidden_fraction": hidden / stats.comm_seconds if stats.comm_seconds else 0.0,
        **result,
    }
    if cfg.check:
        summary["identical_steps"] = stats.identical_steps
        summary["max_reference_diff"] = stats.max_reference_diff
    return summary


def report(s: dict) -> str:
    metric = "accuracy" if "test_accuracy" in s else "r2"
    value = s.get("test_accuracy", s.get("test_r2"))
    shown = f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3f}"
    lines = [
        f"pycomm.train: {s['model']} ({s['parameters']:,} parameters, {s['gradient_mib']:.2f} MiB of gradients "
        f"in {s['buckets']} bucket(s)), {s['ranks']} rank(s), global batch {s['global_batch']}, {s['steps']} steps",
        f"  loss {s['train_loss']:.4f} (train) {s['test_loss']:.4f} (held out)   held-out {metric} {shown}",
        f"  {s['samples_per_s']:,.0f} samples/s   {s['seconds']:.2f} s",
        f"  communication {s['comm_seconds']:.3f} s, of which {s['comm_hidden_fraction'] * s['comm_seconds']:.3f} s "
        f"hidden behind backward ({100 * s['comm_hidden_fraction']:.0f}%; overlap {'on' if s['overlap'] else 'off'}); "
        f"the steps waited {s['comm_wait_seconds']:.3f} s for it",
    ]
    if "identical_steps" in s:
        lines.append(
            f"  check: parameters bitwise identical on every rank after each of {s['identical_steps']} steps; "
            f"against 1-rank training: max relative difference {s['max_reference_diff']:.2e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg, args = parse(argv)
    import pycomm

    comm = pycomm.Communicator(timeout=args.timeout)
    try:
        _limit_blas_threads(args.threads, comm.local_size)
        trainer = Trainer(comm, cfg, _array_module(cfg.device))
        progress = _progress(trainer.total_steps, trainer.start_step, cfg.progress and comm.rank == 0)
        try:
            stats = trainer.train(progress)
        except CheckFailed as e:
            print(f"pycomm.train: rank {comm.rank}: check FAILED: {e}", file=sys.stderr)
            return 1
        finally:
            if progress is not None:
                progress.close()
        summary = summarise(trainer, stats, trainer.evaluate(), comm)
        # No step run (a resumed run that had finished): nothing to compare.
        failed = cfg.check and stats.steps > 0 and not stats.max_reference_diff <= cfg.check_tol
        if comm.rank == 0:
            print(report(summary), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(summary, f, indent=1)
        if failed:
            print(
                f"pycomm.train: rank {comm.rank}: check FAILED: parameters differ from 1-rank training by "
                f"{stats.max_reference_diff:.2e} > --check-tol {cfg.check_tol}",
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        comm.close()
