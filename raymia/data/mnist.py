"""MNIST and Fashion-MNIST read from torchvision's raw layout with raymia's own IDX parser.

Expected under `root`: `MNIST/raw/` or `FashionMNIST/raw/` holding train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each plain or gzipped (.gz).
With `download: true` and files absent, torchvision's MNIST / FashionMNIST class fetches them (it checks
their MD5 sums and reads IDX files, never pickles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from raymia.data.readers import (
    balanced_first,
    check_label_range,
    make_dataset,
    normalise_images,
    one_line,
    read_idx,
)
from raymia.data.registry import DATASETS, Dataset, param_field
from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Params

# Pixel statistics of the training images scaled to [0, 1].
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class MnistLayout:
    title: str
    folder: str  # torchvision's class name, also the folder under root
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def raw(self, root: Path) -> Path:
        return root / self.folder / "raw"

    def how(self) -> str:
        return (
            f"expected torchvision's {self.title} raw layout ({self.folder}/raw/ with train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz) under "
            f"{param_field('root')}; set {param_field('download')}: true to fetch it, or see docs/data.md"
        )


MNIST = MnistLayout("MNIST", "MNIST", MNIST_MEAN, MNIST_STD)
FASHION_MNIST = MnistLayout("Fashion-MNIST", "FashionMNIST", FASHION_MNIST_MEAN, FASHION_MNIST_STD)


class MnistParams(Params):
    root: str = Field(
        "data/", description="folder holding torchvision's raw layout (MNIST/raw/ or FashionMNIST/raw/)"
    )
    download: bool = Field(False, description="fetch the files with torchvision when they are absent")
    limit_train: int | None = Field(
        None, ge=1, description="keep only the first N training images, class-balanced (None: all 60,000)"
    )
    limit_test: int | None = Field(
        None, ge=1, description="keep only the first N test images, class-balanced (None: all 10,000)"
    )


def fetch(layout: MnistLayout, root: Path) -> None:
    """Let torchvision download (and gunzip) the four files into root/<folder>/raw/."""
    import torchvision.datasets as tvd

    try:
        getattr(tvd, layout.folder)(str(root), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"download failed ({type(e).__name__}: {one_line(e)}); place the four IDX files in "
            f"{layout.folder}/raw/ by hand, see docs/data.md",
            where=str(root),
        ) from None


def _find(raw: Path) -> dict[str, Path] | None:
    """The path of each file (plain preferred over .gz), or None when any is absent."""
    found = {}
    for key, name in FILES.items():
        for cand in (raw / name, raw / f"{name}.gz"):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


def _read_split(images: Path, labels: Path, layout: MnistLayout) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if x.shape[1:] != (28, 28):
        raise DataError(
            f"images are {list(x.shape[1:])}; expected 28x28 {layout.title} images", where=str(images)
        )
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{y.shape[0]} labels for {x.shape[0]} images in {images.name}", where=str(labels))
    y = y.astype(np.int64)
    check_label_range(y, 10, str(labels))
    return x.reshape(-1, 1, 28, 28), y


def load_mnist_like(name: str, layout: MnistLayout, p: MnistParams) -> Dataset:
    root = Path(p.root)
    raw = layout.raw(root)
    files = _find(raw)
    if files is None and p.download:
        fetch(layout, root)
        files = _find(raw)
    if files is None:
        if not raw.is_dir():
            raise DataError(f"not found; {layout.how()}", where=str(raw))
        missing = next(
            raw / n for n in FILES.values() if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()
        )
        raise DataError(f"missing (nor {missing.name}.gz); {layout.how()}", where=str(missing))
    x_tr, y_tr = _read_split(files["train_images"], files["train_labels"], layout)
    x_te, y_te = _read_split(files["test_images"], files["test_labels"], layout)
    i_tr = balanced_first(y_tr, p.limit_train, 10)
    i_te = balanced_first(y_te, p.limit_test, 10)
    info = DataInfo(num_classes=10, input_shape=(1, 28, 28), kind="image", mean=layout.mean, std=layout.std)
    return make_dataset(
        name,
        normalise_images(x_tr[i_tr], layout.mean, layout.std),
        y_tr[i_tr],
        normalise_images(x_te[i_te], layout.mean, layout.std),
        y_te[i_te],
        info,
    )


@DATASETS.register("mnist", MnistParams, doc="MNIST (60,000 + 10,000 28x28 grey digits, 10 classes)")
def load_mnist(p: MnistParams) -> Dataset:
    return load_mnist_like("mnist", MNIST, p)


@DATASETS.register(
    "fashion_mnist", MnistParams, doc="Fashion-MNIST (60,000 + 10,000 28x28 grey clothing images, 10 classes)"
)
def load_fashion_mnist(p: MnistParams) -> Dataset:
    return load_mnist_like("fashion_mnist", FASHION_MNIST, p)
