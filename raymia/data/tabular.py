"""The binary-feature tabular benchmarks of the membership-inference literature: Purchase100, Texas100
and Location30, each read from one .npz (arrays `features` [N, F] of 0/1 and `labels` [N], 0-based).

docs/data.md says how to build the .npz from the public releases (Shokri et al.'s Purchase/Texas/Location
archives); nothing here downloads. The loader checks the feature and class counts against the published
ones and splits the rows into train/test with a seeded, stratified split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from raymia.data.readers import as_labels, load_npz, make_dataset
from raymia.data.registry import DATASETS, Dataset
from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Params


@dataclass(frozen=True)
class TabularSpec:
    name: str
    title: str
    num_features: int
    num_classes: int
    rows: int  # rows of the public release, for messages and docs

    def how(self) -> str:
        return (
            f"expected an .npz with arrays features [N, {self.num_features}] (0/1) and labels [N] "
            f"(0..{self.num_classes - 1}) built from the public {self.title} release; see docs/data.md"
        )


PURCHASE100 = TabularSpec("purchase100", "Purchase100", 600, 100, 197_324)
TEXAS100 = TabularSpec("texas100", "Texas100", 6169, 100, 67_330)
LOCATION30 = TabularSpec("location30", "Location30", 446, 30, 5_010)


class TabularParams(Params):
    path: str = Field(
        "data/tabular.npz", description="the .npz (features [N, F], labels [N]); see docs/data.md"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the rows held out as the test split")
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the train/test split")
    stratify: bool = Field(
        True,
        description="stratify the split by label (falls back to a plain random split when a class is too small)",
    )


class Purchase100Params(TabularParams):
    path: str = Field(
        "data/purchase100.npz", description="the .npz (features [N, 600], labels [N]); see docs/data.md"
    )


class Texas100Params(TabularParams):
    path: str = Field(
        "data/texas100.npz", description="the .npz (features [N, 6169], labels [N]); see docs/data.md"
    )


class Location30Params(TabularParams):
    path: str = Field(
        "data/location30.npz", description="the .npz (features [N, 446], labels [N]); see docs/data.md"
    )


def split_indices(
    y: np.ndarray, test_fraction: float, seed: int, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test row indices (each sorted, so file order is kept within a split)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if stratify:
        try:
            tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
            return np.sort(tr), np.sort(te)
        except ValueError:  # a class with a single row, or fewer test rows than classes
            pass
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed)
    return np.sort(tr), np.sort(te)


def _binary_float32(f: np.ndarray, where: str) -> np.ndarray:
    """float32 copy of a 0/1 feature matrix, checked chunk by chunk to bound memory (Texas is 67k x 6k)."""
    if f.dtype.kind not in "biuf":
        raise DataError(f"features must be numeric 0/1; got dtype {f.dtype}", where=where)
    out = np.empty(f.shape, dtype=np.float32)
    step = 4096
    for s in range(0, len(f), step):
        chunk = f[s : s + step].astype(np.float32)
        bad = (chunk != 0) & (chunk != 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(
                f"features must be 0/1; row {s + r}, column {c} holds {f[s + r, c]!r}", where=where
            )
        out[s : s + step] = chunk
    return out


def load_tabular(spec: TabularSpec, path: Path, p: TabularParams) -> Dataset:
    where = str(path)
    arrays = load_npz(path, spec.how())
    for key in ("features", "labels"):
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise DataError(f"no array {key!r} (found: {found}); {spec.how()}", where=where)
    f, y = arrays["features"], arrays["labels"]
    if f.ndim != 2:
        raise DataError(
            f"features must be 2-D [N, {spec.num_features}]; got shape {list(f.shape)}", where=where
        )
    if f.shape[1] != spec.num_features:
        raise DataError(
            f"features have {f.shape[1]} columns; expected {spec.num_features} ({spec.title} has "
            f"{spec.num_features} binary features)",
            where=where,
        )
    if y.ndim == 2 and y.shape[1] == spec.num_classes and y.shape[0] == f.shape[0]:
        raise DataError(
            f"labels are one-hot [N, {spec.num_classes}]; store class indices instead (labels.argmax(1)), "
            "see docs/data.md",
            where=where,
        )
    y = as_labels(y, where)
    if len(y) != len(f):
        raise DataError(f"{len(y)} labels for {len(f)} feature rows", where=where)
    if len(y) < 2:
        raise DataError(f"{len(y)} rows; need at least 2 to split into train and test", where=where)
    lo, hi = int(y.min()), int(y.max())
    k = spec.num_classes
    if lo == 1 and hi == k:
        raise DataError(
            f"labels run 1..{k}: the public release numbers classes from 1; subtract 1 when converting "
            "(see docs/data.md)",
            where=where,
        )
    if lo < 0 or hi >= k:
        found = len(np.unique(y))
        raise DataError(
            f"labels span {lo}..{hi} ({found} distinct); expected {k} classes labelled 0..{k - 1}",
            where=where,
        )
    x = _binary_float32(f, where)
    tr, te = split_indices(y, p.test_fraction, p.split_seed, p.stratify)
    info = DataInfo(num_classes=k, input_shape=(spec.num_features,), kind="tabular")
    return make_dataset(spec.name, x[tr], y[tr], x[te], y[te], info)


@DATASETS.register(
    "purchase100",
    Purchase100Params,
    doc="Purchase100: 600 binary purchase features, 100 shopper clusters (.npz)",
)
def load_purchase100(p: Purchase100Params) -> Dataset:
    return load_tabular(PURCHASE100, Path(p.path), p)


@DATASETS.register(
    "texas100",
    Texas100Params,
    doc="Texas100: 6,169 binary hospital-discharge features, 100 procedures (.npz)",
)
def load_texas100(p: Texas100Params) -> Dataset:
    return load_tabular(TEXAS100, Path(p.path), p)


@DATASETS.register(
    "location30",
    Location30Params,
    doc="Location30: 446 binary Foursquare check-in features, 30 clusters (.npz)",
)
def load_location30(p: Location30Params) -> Dataset:
    return load_tabular(LOCATION30, Path(p.path), p)
