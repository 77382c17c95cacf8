"""The data sets (bundled with scikit-learn: nothing is downloaded) and how ranks split them."""

from typing import NamedTuple

import numpy as np


class DataSet(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int  # 0 for regression


def load(task: str, seed: int, dtype=np.float32) -> DataSet:
    """digits: 8x8 images of 10 digits (classification); diabetes: 10 features -> progression
    (regression). 20% held out, chosen by `seed`, so every rank picks the same split."""
    try:
        from sklearn import datasets
    except ImportError:
        raise SystemExit("pycomm.train needs scikit-learn for its data: pip install 'pycomm[train]'") from None
    if task == "digits":
        bunch = datasets.load_digits()
        x, y, classes = bunch.data / 16.0, bunch.target.astype(np.int64), 10
    else:
        bunch = datasets.load_diabetes()
        x, y, classes = bunch.data, bunch.target, 0
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
    order = np.random.default_rng(seed).permutation(len(x))
    held_out = len(x) // 5
    test, train = order[:held_out], order[held_out:]
    if classes == 0:
        y = y.astype(dtype)
    x = x.astype(dtype)
    return DataSet(x[train], y[train], x[test], y[test], classes)


def steps_per_epoch(samples: int, global_batch: int) -> int:
    # Every step takes a full global batch (the tail of an epoch is dropped), so every rank's
    # shard has the same size and the average of shard means is the global mean.
    return samples // global_batch


def global_batch(samples: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Indices of the samples in global batch `step`: a fresh shuffle each epoch, the same on every
    rank, and a function of the step alone, so a resumed run sees the data a whole run would."""
    per_epoch = steps_per_epoch(samples, batch)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(samples)
    return order[index * batch : (index + 1) * batch]


def shard(indices: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (len(indices) % size == 0)."""
    per_rank = len(indices) // size
    return indices[rank * per_rank : (rank + 1) * per_rank]
