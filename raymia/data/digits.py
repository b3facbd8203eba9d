"""scikit-learn's bundled digits: 1,797 grey 8x8 images of 10 digits, no download needed.

The file is read, and split, without importing scikit-learn: its import (about a second) would be paid by
every process that loads the quickstart's data, the sweep's driver and each bank worker. The split is
sklearn's stratified `train_test_split` step for step (`stratified_split`; tests/test_datasets.py checks that
both give the same indices), so the digits' splits stay what they were.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from raymia.data.registry import DATASETS, Dataset, param_field
from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.registry import Params

# Pixel statistics of the whole set after scaling 0..16 to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


class DigitsParams(Params):
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of the 1,797 images held out as test split")
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the stratified train/test split")


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 [1797, 64] in 0..16, labels int64 [1797]) as sklearn's `load_digits` returns them."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(next(iter(spec.submodule_search_locations or ())), "datasets", "data", "digits.csv.gz") \
        if spec is not None else None
    if path is None or not path.is_file():  # a packaging that moved the file: let sklearn find it
        from sklearn.datasets import load_digits as sk_load

        d = sk_load()
        return d.data, d.target.astype(np.int64)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """sklearn.utils.extmath._approximate_mode: per-class draws proportional to counts, the remainder going
    to the largest fractional parts (ties broken by rng)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of `train_test_split(arange(len(y)), test_size=test_fraction,
    random_state=seed, stratify=y)`: sklearn's StratifiedShuffleSplit with one split, the same draws from
    the same RandomState."""
    n_test = math.ceil(test_fraction * len(y))
    n_train = len(y) - n_test
    _, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if min(n_train, n_test) < len(counts):
        raise SpecError(f"test_fraction {test_fraction} leaves {n_train} training and {n_test} test images of "
                        f"{len(y)}; each split needs one image of each of the {len(counts)} classes",
                        where=param_field("test_fraction"))
    by_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(by_class):
        perm = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


@DATASETS.register("digits", DigitsParams, doc="scikit-learn's 8x8 digits (1,797 images, 10 classes), bundled")
def load_digits(p: DigitsParams) -> Dataset:
    pixels, y = read_digits()
    x = (pixels.astype(np.float32) / 16.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    x = x.reshape(-1, 1, 8, 8)
    idx_tr, idx_te = stratified_split(y, p.test_fraction, p.split_seed)
    info = DataInfo(num_classes=10, input_shape=(1, 8, 8), kind="image", mean=DIGITS_MEAN, std=DIGITS_STD)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x[idx_tr]),
        y_train=torch.from_numpy(y[idx_tr]),
        x_test=torch.from_numpy(x[idx_te]),
        y_test=torch.from_numpy(y[idx_te]),
        info=info,
    )
