"""A seeded synthetic classification set, no files: class-conditional Gaussians.

Each class k has a mean mu_k drawn from the seed, uniformly on a sphere of radius separation / sqrt(2), so
two class means lie about `separation` apart; an input of class k is mu_k + N(0, I). Labels are balanced
(counts differ by at most one) and shuffled. Kind "image" reshapes the vectors to [1, S, S]; the values
are already centred and of unit noise scale, so no mean/std is recorded.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from raymia.data.readers import make_dataset
from raymia.data.registry import DATASETS, Dataset
from raymia.datainfo import DataInfo
from raymia.registry import Params


class SyntheticParams(Params):
    num_classes: int = Field(10, ge=2, description="classes K (labels 0..K-1), each a Gaussian around its own mean")
    num_features: int = Field(20, ge=1, description="input dimension of the tabular kind")
    num_train: int = Field(1000, ge=1, validation_alias="n_train",
                           description="examples in the training split, the classes in turn")
    num_test: int = Field(500, ge=1, validation_alias="n_test", description="examples in the test split, the classes in turn")
    kind: Literal["tabular", "image"] = Field(
        "tabular", description="tabular [F] vectors or [1, S, S] images"
    )
    image_size: int = Field(8, ge=1, description="side S of the [1, S, S] images of the image kind")
    separation: float = Field(
        2.0, ge=0, description="typical distance between two class means, in units of the per-dimension noise"
    )
    seed: int = Field(0, ge=0, description="seed of the class means and of every example")


def _split(rng: np.random.Generator, means: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    k, d = means.shape
    y = rng.permutation(np.arange(n) % k).astype(np.int64)
    x = means[y] + rng.standard_normal((n, d))
    return x.astype(np.float32), y


@DATASETS.register("synthetic", SyntheticParams, doc="seeded class-conditional Gaussians, no files")
def load_synthetic(p: SyntheticParams) -> Dataset:
    shape: tuple[int, ...] = (1, p.image_size, p.image_size) if p.kind == "image" else (p.num_features,)
    d = int(np.prod(shape))
    rng = np.random.default_rng([p.seed, 0x5EED])
    directions = rng.standard_normal((p.num_classes, d))
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    means = directions * (p.separation / np.sqrt(2.0))
    x_tr, y_tr = _split(rng, means, p.num_train)
    x_te, y_te = _split(rng, means, p.num_test)
    info = DataInfo(num_classes=p.num_classes, input_shape=shape, kind=p.kind)
    return make_dataset("synthetic", x_tr.reshape(-1, *shape), y_tr, x_te.reshape(-1, *shape), y_te, info)
