"""Datasets (bundled digits, synthetic, a user's .npz) and the deterministic batch sampler.

Every dataset arrives as numpy arrays X (n x d, float) and y (n, int labels). With
shuffle off, step t reads rows [(t mod nb) B, (t mod nb) B + B) with nb = n // B (drop-last).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError


@dataclass
class Dataset:
    """Train and (optional) test arrays, and where they came from for error messages."""

    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        labels = [y for y in (self.y_train, self.y_test) if y is not None and len(y)]  # a test set may be empty
        return int(max(int(y.max()) for y in labels)) + 1


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A fixed random train/test split."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each feature to zero mean and unit variance with the training set's statistics."""
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # constant pixels (the digits' borders) stay constant
    return (x_train - mean) / std, (x_test - mean) / std


def digits(test_fraction: float, split_seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), standardised."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    bunch = load_digits()
    x_train, y_train, x_test, y_test = split(bunch.data, bunch.target, test_fraction, split_seed)
    x_train, x_test = standardise(x_train, x_test)
    return Dataset("digits", x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def synthetic(n: int, dim: int, classes: int, noise: float, seed: int, test_fraction: float) -> Dataset:
    """Gaussian inputs labelled by a random linear teacher plus noise: learnable, any size."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    teacher = rng.normal(size=(dim, classes))
    y = np.argmax(x @ teacher + noise * rng.normal(size=(n, classes)), axis=1).astype(np.int64)
    x_train, y_train, x_test, y_test = split(x, y, test_fraction, seed)
    return Dataset("synthetic", x_train, y_train, x_test, y_test)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; set data.path to an .npz with arrays X and y")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array {missing[0]!r} (found {archive.files}); "
                                "save with np.savez(path, X=..., y=...)")
            return archive["X"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def _check_arrays(path: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: X must be a 2-D numeric array (n x d), got shape {x.shape} of {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must be a 1-D integer array of labels, got shape {y.shape} of {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{path}: X has {len(x)} rows but y has {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{path}: the file holds no rows")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: X has a NaN or infinite value (first in row {row}); clean the data")
    if y.min() < 0:
        raise DataError(f"{path}: label {int(y.min())} is negative; labels must be 0 .. classes-1")
    return x.astype(np.float64), y.astype(np.int64)


def npz(path: str, test_path: str | None) -> Dataset:
    """A user's .npz file (arrays X and y), rows in file order; an optional second file for testing."""
    x, y = _check_arrays(path, *_read_npz(path))
    if not test_path:
        return Dataset(path, x, y)
    x_test, y_test = _check_arrays(test_path, *_read_npz(test_path))
    if x_test.shape[1] != x.shape[1]:
        raise DataError(f"{test_path}: X has {x_test.shape[1]} columns but {path} has {x.shape[1]}")
    return Dataset(path, x, y, x_test, y_test)


def check_model_fits(data: Dataset, in_dim: int, out_dim: int) -> None:
    """The model's input width and number of outputs must fit the data."""
    if data.in_dim != in_dim:
        raise DataError(f"{data.source}: X has {data.in_dim} columns but model.in_dim={in_dim}; "
                        "set model.in_dim=null to infer it")
    for y in (data.y_train, data.y_test):
        if y is not None and len(y) and int(y.max()) >= out_dim:
            raise DataError(f"{data.source}: label {int(y.max())} is outside [0, {out_dim}) for "
                            f"model.out_dim={out_dim}; set model.out_dim=null to infer it")


class BatchSampler:
    """Which rows make up the batch of step t: a pure function of (seed, t), drop-last.

    With d replicas (parallel.dp) each gets consecutive rows of the same global batch, in shares
    that differ by at most one row (the first B mod d get one more), so together they read
    exactly the batch one device would.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool, replica: int = 0,
                 num_replicas: int = 1):
        self.num_rows, self.batch_size = num_rows, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = num_rows // batch_size
        self.replica, self.num_replicas = replica, num_replicas

    def indices(self, step: int) -> np.ndarray:
        """This replica's rows of step `step`'s global batch (all of it with one replica)."""
        return np.array_split(self.global_indices(step), self.num_replicas)[self.replica]

    def global_indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        start = position * self.batch_size
        if not self.shuffle:
            return np.arange(start, start + self.batch_size)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return order[start:start + self.batch_size]
