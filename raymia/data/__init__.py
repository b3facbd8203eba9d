"""Data sets: a registry of loaders, each returning a `Dataset` (train/test tensors + `DataInfo`).

Each loader module registers its entries in `DATASETS`; the registry imports every module of this package
the first time it is read (raymia.plugins), so adding a data set is adding a module (docs/extending.md).
"""

from raymia.data.registry import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
