"""Images in a folder tree, torchvision ImageFolder style: `root/train/<class>/*.png` and
`root/test/<class>/*.png`, with the same class folders in both. Images are decoded with PIL (through
torchvision), resized to image_size x image_size, scaled to [0, 1] and standardised per channel with the
train split's mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from raymia.data.readers import channel_stats, make_dataset, one_line
from raymia.data.registry import DATASETS, Dataset, param_field
from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Params


def how() -> str:
    return (f"expected train/ and test/ folders under {param_field('root')}, each with one sub-folder of images per "
            "class (torchvision ImageFolder layout, same class folders in both); see docs/data.md")


class ImageFolderParams(Params):
    root: str = Field("data/images", description="folder holding train/<class>/... and test/<class>/...")
    image_size: int = Field(32, ge=1, description="images are resized to image_size x image_size")
    grayscale: bool = Field(False, description="convert to one grey channel instead of RGB")


def _read_split(folder: Path, p: ImageFolderParams) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    where = str(folder)
    if not folder.is_dir():
        raise DataError(f"not found; {how()}", where=where)
    steps = [transforms.Resize((p.image_size, p.image_size))]
    if p.grayscale:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.ToTensor())
    tf = transforms.Compose(steps)
    try:
        ds = ImageFolder(where)
    except (FileNotFoundError, OSError) as e:  # no class folders, or a class folder without images
        raise DataError(f"{one_line(e)}; {how()}", where=where) from None
    xs, ys = [], []
    for path, label in ds.samples:
        try:
            img = ds.loader(path)  # PIL, converted to RGB
            xs.append(tf(img).numpy())
        except Exception as e:
            raise DataError(f"not a readable image ({type(e).__name__}: {one_line(e)})", where=path) from None
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64), list(ds.classes)


@DATASETS.register("imagefolder", ImageFolderParams, doc="images in train/<class>/ and test/<class>/ folders")
def load_imagefolder(p: ImageFolderParams) -> Dataset:
    root = Path(p.root)
    x_tr, y_tr, classes = _read_split(root / "train", p)
    x_te, y_te, test_classes = _read_split(root / "test", p)
    if test_classes != classes:
        missing = sorted(set(classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"class folders differ from train/ (missing: {', '.join(missing) or 'none'}; extra: "
            f"{', '.join(extra) or 'none'}); {how()}",
            where=str(root / "test"),
        )
    if len(classes) < 2:
        raise DataError(f"{len(classes)} class folder; need at least 2 classes", where=str(root / "train"))
    mean, std = channel_stats(x_tr)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    info = DataInfo(
        num_classes=len(classes),
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),
        kind="image",
        mean=mean,
        std=std,
    )
    return make_dataset("imagefolder", (x_tr - m) / s, y_tr, (x_te - m) / s, y_te, info)
