"""Checkpoints: written by rank 0 atomically (a temporary file, then rename), so a run killed at
any moment leaves either the previous checkpoint or the new one, never a torn file."""

import json
import os

import numpy as np


def save(path: str, step: int, params: np.ndarray, velocity: np.ndarray, meta: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, step=np.int64(step), params=params, velocity=velocity, meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str) -> tuple:
    """(step, params, velocity, meta) from a checkpoint file."""
    with np.load(path) as f:
        return int(f["step"]), f["params"], f["velocity"], json.loads(str(f["meta"]))
