"""scikit-learn's bundled digits: 1,797 grey 8x8 images of 10 digits, no download needed."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from raymia.data.registry import DATASETS, Dataset
from raymia.datainfo import DataInfo
from raymia.registry import Params

# Pixel statistics of the whole set after scaling 0..16 to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


class DigitsParams(Params):
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of the 1,797 images held out as test split")
    split_seed: int = Field(0, ge=0, description="seed of the stratified train/test split")


@DATASETS.register("digits", DigitsParams, doc="scikit-learn's 8x8 digits (1,797 images, 10 classes), bundled")
def load_digits(p: DigitsParams) -> Dataset:
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    d = sk_load()
    x = (d.data.astype(np.float32) / 16.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    x = x.reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(
        np.arange(len(y)), test_size=p.test_fraction, random_state=p.split_seed, stratify=y
    )
    info = DataInfo(num_classes=10, input_shape=(1, 8, 8), kind="image", mean=DIGITS_MEAN, std=DIGITS_STD)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x[idx_tr]),
        y_train=torch.from_numpy(y[idx_tr]),
        x_test=torch.from_numpy(x[idx_te]),
        y_test=torch.from_numpy(y[idx_te]),
        info=info,
    )
