"""CIFAR-10 and CIFAR-100 read from torchvision's on-disk layouts, with raymia's own parsers.

Accepted under `root` (checked in this order):
- the Python version: `cifar-10-batches-py/` (data_batch_1..5, test_batch) or `cifar-100-python/` (train,
  test), pickles read with a restricted unpickler that rebuilds numpy arrays and nothing else;
- the binary version: `cifar-10-batches-bin/` (data_batch_1..5.bin, test_batch.bin; records of 1 label
  byte + 3072 pixel bytes) or `cifar-100-binary/` (train.bin, test.bin; coarse byte, fine byte, 3072 bytes).
With `download: true` and neither layout complete, torchvision's download helper fetches and extracts the
official Python archive (checksum verified); raymia then parses it like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from raymia.data.readers import (
    balanced_first,
    check_label_range,
    load_restricted_pickle,
    make_dataset,
    normalise_images,
    one_line,
    read_records,
)
from raymia.data.registry import DATASETS, Dataset, param_field
from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Params

# Per-channel statistics of the training images scaled to [0, 1] (the values used across the literature).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    title: str  # "CIFAR-10"
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    label_key: bytes  # b"labels" or b"fine_labels"
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    label_byte: int  # index of the (fine) label byte in a binary record
    torchvision_class: str  # "CIFAR10": whose url / filename / md5 the download uses

    @property
    def record(self) -> int:
        return self.label_byte + 1 + PIXELS

    def py_files(self, root: Path) -> list[Path]:
        return [root / self.py_dir / f for f in (*self.py_train, self.py_test)]

    def bin_files(self, root: Path) -> list[Path]:
        return [root / self.bin_dir / f for f in (*self.bin_train, self.bin_test)]

    def how(self) -> str:
        return (
            f"expected torchvision's {self.title} layout ({self.py_dir}/ or {self.bin_dir}/) under "
            f"{param_field('root')}; set {param_field('download')}: true to fetch it, or see docs/data.md"
        )


CIFAR10 = CifarLayout(
    title="CIFAR-10",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    py_dir="cifar-10-batches-py",
    py_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    py_test="test_batch",
    label_key=b"labels",
    bin_dir="cifar-10-batches-bin",
    bin_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    bin_test="test_batch.bin",
    label_byte=0,
    torchvision_class="CIFAR10",
)

CIFAR100 = CifarLayout(
    title="CIFAR-100",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    py_dir="cifar-100-python",
    py_train=("train",),
    py_test="test",
    label_key=b"fine_labels",
    bin_dir="cifar-100-binary",
    bin_train=("train.bin",),
    bin_test="test.bin",
    label_byte=1,
    torchvision_class="CIFAR100",
)


class CifarParams(Params):
    root: str = Field(
        "data/", description="folder holding torchvision's CIFAR layout (the *-py or *-bin folder)"
    )
    download: bool = Field(
        False, description="fetch the official archive with torchvision when the files are absent"
    )
    limit_train: int | None = Field(
        None, ge=1, description="keep only the first N training images, class-balanced (None: all 50,000)"
    )
    limit_test: int | None = Field(
        None, ge=1, description="keep only the first N test images, class-balanced (None: all 10,000)"
    )


def fetch(layout: CifarLayout, root: Path) -> None:
    """Download and extract the official Python archive into root (torchvision checks its MD5).

    Only torchvision's download helper runs: the extracted files are parsed by raymia, never by
    torchvision's own pickle-based loader.
    """
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(tvd, layout.torchvision_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:
        raise DataError(
            f"download of {cls.url} failed ({type(e).__name__}: {one_line(e)}); fetch {cls.filename} by hand "
            "and extract it here, see docs/data.md",
            where=str(root),
        ) from None


def _read_py_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    where = str(path)
    obj = load_restricted_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(
            f"not a {layout.title} batch: the pickle holds a {type(obj).__name__}, expected a dict",
            where=where,
        )
    key = layout.label_key

    def get(k: bytes) -> object:
        if k in obj:
            return obj[k]
        if k.decode() in obj:  # written by Python 3 with str keys
            return obj[k.decode()]
        raise DataError(f"not a {layout.title} batch: no {k.decode()!r} entry", where=where)

    data, labels = get(b"data"), get(key)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != PIXELS
    ):
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"'data' must be uint8 [N, {PIXELS}]; got {got}", where=where)
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{key.decode()!r} must be a list of integers", where=where) from None
    if y.shape != (data.shape[0],):
        raise DataError(
            f"{key.decode()!r} has shape {list(y.shape)}; expected [{data.shape[0]}] (one label per image)",
            where=where,
        )
    check_label_range(y, layout.num_classes, where, what=key.decode())
    return data, y


def _read_bin_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    recs = read_records(path, layout.record, f"{layout.title} binary batch")
    y = recs[:, layout.label_byte].astype(np.int64)
    check_label_range(y, layout.num_classes, str(path), what="fine labels" if layout.label_byte else "labels")
    return recs[:, layout.label_byte + 1 :], y


Reader = Callable[[Path, "CifarLayout"], tuple[np.ndarray, np.ndarray]]


def _read_split(files: list[Path], reader: Reader, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    parts = [reader(f, layout) for f in files]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return x.reshape(-1, 3, 32, 32), y


def _locate(layout: CifarLayout, root: Path, download: bool) -> tuple[list[Path], Reader]:
    """The files of the first complete layout, fetching the Python one when allowed; else DataError."""
    py, bn = layout.py_files(root), layout.bin_files(root)
    if all(f.is_file() for f in py):
        return py, _read_py_batch
    if all(f.is_file() for f in bn):
        return bn, _read_bin_batch
    if download:
        fetch(layout, root)
        if all(f.is_file() for f in py):
            return py, _read_py_batch
        missing = next(f for f in py if not f.is_file())
        raise DataError(f"still missing after the download; {layout.how()}", where=str(missing))
    for files, folder in ((py, layout.py_dir), (bn, layout.bin_dir)):
        if (root / folder).is_dir():
            missing = next(f for f in files if not f.is_file())
            names = ", ".join(f.name for f in files)
            raise DataError(f"missing; {folder}/ must hold {names}; {layout.how()}", where=str(missing))
    raise DataError(f"not found; {layout.how()}", where=str(root / layout.py_dir))


def load_cifar(name: str, layout: CifarLayout, p: CifarParams) -> Dataset:
    files, reader = _locate(layout, Path(p.root), p.download)
    n_train = len(files) - 1
    x_tr, y_tr = _read_split(files[:n_train], reader, layout)
    x_te, y_te = _read_split(files[n_train:], reader, layout)
    i_tr = balanced_first(y_tr, p.limit_train, layout.num_classes)
    i_te = balanced_first(y_te, p.limit_test, layout.num_classes)
    info = DataInfo(
        num_classes=layout.num_classes,
        input_shape=(3, 32, 32),
        kind="image",
        mean=layout.mean,
        std=layout.std,
    )
    return make_dataset(
        name,
        normalise_images(x_tr[i_tr], layout.mean, layout.std),
        y_tr[i_tr],
        normalise_images(x_te[i_te], layout.mean, layout.std),
        y_te[i_te],
        info,
    )


@DATASETS.register("cifar10", CifarParams, doc="CIFAR-10 (50,000 + 10,000 32x32 colour images, 10 classes)")
def load_cifar10(p: CifarParams) -> Dataset:
    return load_cifar("cifar10", CIFAR10, p)


@DATASETS.register(
    "cifar100", CifarParams, doc="CIFAR-100 (50,000 + 10,000 32x32 colour images, 100 fine classes)"
)
def load_cifar100(p: CifarParams) -> Dataset:
    return load_cifar("cifar100", CIFAR100, p)
