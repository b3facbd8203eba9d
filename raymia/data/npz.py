"""Any data set saved as one .npz with arrays x_train, y_train, x_test, y_test (read without pickle).

Images are 3-D [N, H, W] (grey, becomes [N, 1, H, W]) or 4-D [N, H, W, C] / [N, C, H, W] with 1 or 3
channels; tabular inputs are 2-D [N, F]. With `normalize: auto`, uint8 images are scaled to [0, 1] and
standardised per channel with the train split's mean/std, float images are used as they are, and tabular
inputs are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from raymia.data.readers import as_labels, channel_stats, check_label_range, load_npz, make_dataset
from raymia.data.registry import DATASETS, Dataset, param_field
from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Params

KEYS = ("x_train", "y_train", "x_test", "y_test")
HOW = "expected an .npz with arrays x_train, y_train, x_test, y_test (see docs/data.md)"


class NpzParams(Params):
    path: str = Field("data/dataset.npz", description="the .npz holding x_train, y_train, x_test, y_test")
    kind: Literal["auto", "image", "tabular"] = Field(
        "auto", description="auto: 3-D or 4-D x arrays are images, 2-D ones tabular"
    )
    num_classes: int | None = Field(
        None, ge=2, description="number of classes (None: the largest label in either split + 1)"
    )
    normalize: Literal["auto", "none", "standardize"] = Field(
        "auto",
        description="auto: uint8 images /255 then per-channel train mean/std, float images and tabular as they are; "
        "none: uint8 images only /255; standardize: images per channel, tabular per feature, on train statistics",
    )


def _to_nchw(x: np.ndarray, where: str, key: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{key} has shape {list(x.shape)}; images must be [N, H, W], [N, H, W, C] or [N, C, H, W]",
            where=where,
        )
    last, first = x.shape[3], x.shape[1]
    if last in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if first in (1, 3):
        return x
    raise DataError(
        f"{key} has shape {list(x.shape)}; 4-D images need 1 or 3 channels, first ([N, C, H, W]) or last "
        "([N, H, W, C])",
        where=where,
    )


def _numeric(x: np.ndarray, where: str, key: str) -> None:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{key} must be numeric; got dtype {x.dtype}", where=where)


@DATASETS.register("npz", NpzParams, doc="any data set in one .npz (x_train, y_train, x_test, y_test)")
def load_npz_dataset(p: NpzParams) -> Dataset:
    path = Path(p.path)
    where = str(path)
    x_tr, y_tr, x_te, y_te = _read_arrays(path)
    kind = _kind(p.kind, x_tr, where)
    if kind == "image":
        x_tr, x_te = _to_nchw(x_tr, where, "x_train"), _to_nchw(x_te, where, "x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"x_train inputs are {list(x_tr.shape[1:])} but x_test inputs are {list(x_te.shape[1:])}",
            where=where,
        )
    num_classes = p.num_classes
    if num_classes is None:
        num_classes = max(int(y_tr.max(initial=0)), int(y_te.max(initial=0))) + 1
        if num_classes < 2:
            raise DataError(f"labels hold a single class; set {param_field('num_classes')}", where=where)
        present = len(np.union1d(y_tr, y_te))
        if num_classes > max(1000, 4 * present):  # every model would get num_classes outputs
            raise DataError(f"the largest label, {num_classes - 1}, would make {num_classes} classes for {present} "
                            f"distinct labels; map the labels to 0..K-1, or set {param_field('num_classes')}", where=where)
    check_label_range(y_tr, num_classes, where, "y_train")
    check_label_range(y_te, num_classes, where, "y_test")
    x_tr, x_te, mean, std = _normalize(x_tr, x_te, kind, p.normalize)
    info = DataInfo(
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),
        kind=kind,
        mean=mean,
        std=std,
    )
    return make_dataset("npz", x_tr, y_tr, x_te, y_te, info)


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from the file, each checked: numeric inputs, integer labels, as
    many labels as rows, train and test of the same rank."""
    where = str(path)
    arrays = load_npz(path, HOW)
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise DataError(f"no array {missing[0]!r} (found: {found}); {HOW}", where=where)
    x_tr, x_te = arrays["x_train"], arrays["x_test"]
    for key, x in (("x_train", x_tr), ("x_test", x_te)):
        _numeric(x, where, key)
    y_tr = as_labels(arrays["y_train"], where, "y_train")
    y_te = as_labels(arrays["y_test"], where, "y_test")
    for key, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim == 0 or len(x) != len(y):
            raise DataError(
                f"x_{key} has {len(x) if x.ndim else 0} rows but y_{key} has {len(y)} labels", where=where
            )
    if x_tr.ndim != x_te.ndim:
        raise DataError(f"x_train is {x_tr.ndim}-D but x_test is {x_te.ndim}-D", where=where)
    return x_tr, y_tr, x_te, y_te


def _kind(kind: str, x_tr: np.ndarray, where: str) -> str:
    """'image' or 'tabular': as given, or ('auto') from the rank of x_train."""
    if kind == "auto":
        if x_tr.ndim in (3, 4):
            return "image"
        if x_tr.ndim == 2:
            return "tabular"
        raise DataError(
            f"x_train has shape {list(x_tr.shape)}; expected 2-D (tabular) or 3-D/4-D (images)",
            where=where,
        )
    if kind == "tabular" and x_tr.ndim != 2:
        raise DataError(
            f"kind tabular needs 2-D x arrays [N, F]; x_train has shape {list(x_tr.shape)}", where=where
        )
    return kind


def _normalize(x_tr: np.ndarray, x_te: np.ndarray, kind: str, normalize: str):
    """float32 inputs, standardised with the training split's statistics where asked (images: per channel,
    after uint8 pixels are scaled to [0, 1]); returns them with the image channel mean and std (or None)."""
    mean = std = None
    if kind == "image":
        scaled = x_tr.dtype == np.uint8
        x_tr = x_tr.astype(np.float32) / 255.0 if scaled else x_tr.astype(np.float32)
        x_te = x_te.astype(np.float32) / 255.0 if scaled else x_te.astype(np.float32)
        if normalize == "standardize" or (normalize == "auto" and scaled):
            mean, std = channel_stats(x_tr)
            m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
            s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
            x_tr = (x_tr - m) / s
            x_te = (x_te - m) / s
    else:
        x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
        if normalize == "standardize":
            m = x_tr.mean(axis=0, dtype=np.float64)
            s = x_tr.std(axis=0, dtype=np.float64)
            s[s == 0] = 1.0
            x_tr = ((x_tr - m) / s).astype(np.float32)
            x_te = ((x_te - m) / s).astype(np.float32)
    return x_tr, x_te, mean, std
