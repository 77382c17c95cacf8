"""The training loop: shard each global batch, backward into gradient buckets, average, update."""

import hashlib
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, data
from .buckets import GradientBuckets, LocalGradients
from .models import build


@dataclass
class Config:
    model: str = "mlp"
    width: int = 128
    layers: int = 2
    batch: int = 128  # global batch, split evenly over the ranks
    lr: float = 0.05
    momentum: float = 0.9
    epochs: int = 10
    steps: int = 0  # overrides epochs when set
    bucket_bytes: int = 25 << 20
    overlap: bool = True
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    check: bool = False
    check_tol: float = 1e-3
    checkpoint: str = ""
    every: int = 100
    resume: bool = False
    kill_at_step: int = -1  # for tests: every rank dies (SIGKILL) after this many steps
    progress: bool = True


@dataclass
class Stats:
    steps: int = 0
    seconds: float = 0.0
    comm_seconds: float = 0.0  # how long the bucket allreduces ran
    wait_seconds: float = 0.0  # how long the step waited for them after backward
    identical_steps: int = 0  # steps after which every rank's parameters were compared bitwise
    max_reference_diff: float = float("nan")
    losses: list = field(default_factory=list)


def sgd(params: list, grads: list, velocity: list, lr: float, momentum: float) -> None:
    for p, g, v in zip(params, grads, velocity):
        v *= momentum
        v += g
        p -= lr * v


class Trainer:
    def __init__(self, comm, cfg: Config, xp=np):
        self.comm, self.cfg, self.xp = comm, cfg, xp
        if cfg.batch % comm.size:
            raise SystemExit(f"pycomm.train: --batch {cfg.batch} must divide evenly over {comm.size} ranks")
        task = "diabetes" if cfg.model == "linear" else "digits"
        self.data = data.load(task, cfg.seed, cfg.dtype)
        d = self.data
        self.x_train, self.y_train = xp.asarray(d.x_train), xp.asarray(d.y_train)
        self.model = build(cfg.model, d.x_train.shape[1], d.classes, cfg.width, cfg.layers, xp)
        self.steps_per_epoch = data.steps_per_epoch(len(d.x_train), cfg.batch)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"pycomm.train: --batch {cfg.batch} exceeds the {len(d.x_train)} training samples")
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        # Ranks start from different values on purpose: the broadcast from rank 0 must make them equal.
        initial = self.model.initial(np.random.default_rng([cfg.seed, comm.rank]), cfg.dtype)
        self.params = xp.asarray(initial)
        self.velocity = xp.zeros_like(self.params)
        self.start_step = self._resume() if cfg.resume else 0
        if not cfg.resume:
            comm.broadcast(self.params, root=0)
        self.buckets = GradientBuckets(
            comm, self.model, cfg.bucket_bytes, cfg.dtype, cfg.overlap, device=cfg.device == "gpu"
        )
        self.views = self.model.views(self.params)
        self.velocity_views = self.model.views(self.velocity)
        if cfg.check:  # the same training on one rank with the whole global batch
            self.reference = (self.params.copy(), self.velocity.copy())
            self.reference_grads = LocalGradients(self.model, cfg.dtype)

    # -- what is saved ---------------------------------------------------------------------------

    def meta(self) -> dict:
        c = self.cfg
        return {
            "model": self.model.describe(),
            "dtype": c.dtype,
            "batch": c.batch,
            "seed": c.seed,
            "lr": c.lr,
            "momentum": c.momentum,
        }

    def _resume(self) -> int:
        """Rank 0 reads the checkpoint and broadcasts it; every rank learns whether that worked."""
        status = np.zeros(2, np.int64)  # [0 ok / 1 missing / 2 other run's, step]
        if self.comm.rank == 0:
            if not os.path.exists(self.cfg.checkpoint):
                status[0] = 1
            else:
                step, params, velocity, meta = checkpoint.load(self.cfg.checkpoint)
                if meta != self.meta() or params.shape != self.params.shape:
                    status[0] = 2
                else:
                    status[1] = step
                    self.params[...] = self.xp.asarray(params)
                    self.velocity[...] = self.xp.asarray(velocity)
        self.comm.broadcast(status, root=0)
        if status[0] == 1:
            raise SystemExit(f"pycomm.train: --resume: no checkpoint at {self.cfg.checkpoint}")
        if status[0] == 2:
            raise SystemExit(f"pycomm.train: --resume: {self.cfg.checkpoint} was written by a different run")
        self.comm.broadcast(self.params, root=0)
        self.comm.broadcast(self.velocity, root=0)
        return int(status[1])

    def save(self, step: int) -> None:
        if self.comm.rank == 0 and self.cfg.checkpoint:
            checkpoint.save(self.cfg.checkpoint, step, _host(self.params), _host(self.velocity), self.meta())

    # -- training ----------------------------------------------------------------------------------

    def step(self, step: int, stats: Stats) -> float:
        cfg = self.cfg
        batch = data.global_batch(len(self.data.x_train), cfg.batch, cfg.seed, step)
        mine = self.xp.asarray(data.shard(batch, self.comm.rank, self.comm.size))
        loss = self.model.loss_and_backward(self.views, self.x_train[mine], self.y_train[mine], self.buckets)
        ran, waited = self.buckets.finish()
        stats.comm_seconds += ran
        stats.wait_seconds += waited
        sgd(self.views, self.buckets.grads, self.velocity_views, cfg.lr, cfg.momentum)
        if cfg.check:
            self._check_step(batch, stats)
        return loss

    def _check_step(self, batch: np.ndarray, stats: Stats) -> None:
        digest = np.frombuffer(hashlib.blake2b(_host(self.params).tobytes(), digest_size=16).digest(), np.uint8)
        digests = self.comm.allgather(digest).reshape(self.comm.size, -1)
        if not (digests == digests[0]).all():
            raise CheckFailed(f"parameters differ between ranks after step {stats.steps + self.start_step}")
        stats.identical_steps += 1
        params, velocity = self.reference
        views, index = self.model.views(params), self.xp.asarray(batch)
        self.model.loss_and_backward(views, self.x_train[index], self.y_train[index], self.reference_grads)
        sgd(views, self.reference_grads.grads, self.model.views(velocity), self.cfg.lr, self.cfg.momentum)

    def reference_difference(self) -> float:
        """max |p - p_ref| / (1 + max |p_ref|): the data-parallel run against 1-rank training."""
        ref = _host(self.reference[0]).astype(np.float64)
        return float(np.abs(_host(self.params) - ref).max() / (1.0 + np.abs(ref).max()))

    def train(self, progress=None) -> Stats:
        cfg, stats = self.cfg, Stats()
        start = time.perf_counter()
        for step in range(self.start_step, self.total_steps):
            loss = self.step(step, stats)
            stats.steps += 1
            stats.losses.append(loss)
            done = step + 1
            if cfg.checkpoint and (done % cfg.every == 0 or done == self.total_steps):
                self.save(done)
            if progress is not None:
                progress.update(1)
                if done % 10 == 0:
                    progress.set_postfix(loss=f"{loss:.4f}")
            if done == cfg.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
        _synchronize(self.xp)
        stats.seconds = time.perf_counter() - start
        if cfg.check and stats.steps:
            stats.max_reference_diff = self.reference_difference()
        return stats

    def evaluate(self) -> dict:
        d, xp = self.data, self.xp
        train = self.model.evaluate(self.views, self.x_train, self.y_train)
        test = self.model.evaluate(self.views, xp.asarray(d.x_test), xp.asarray(d.y_test))
        metric = "accuracy" if d.classes else "r2"
        return {"train_loss": train[0], "test_loss": test[0], f"test_{metric}": test[1]}


class CheckFailed(Exception):
    pass


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else a


def _synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
