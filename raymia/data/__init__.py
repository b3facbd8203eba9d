"""Data sets: a registry of loaders, each returning a `Dataset` (train/test tensors + `DataInfo`)."""

from raymia.data import digits as _digits  # noqa: F401,E402  (registers "digits")
from raymia.data.registry import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
