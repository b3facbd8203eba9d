"""Data sets: a registry of loaders, each returning a `Dataset` (train/test tensors + `DataInfo`)."""

# Each module registers its entries on import.
from raymia.data import cifar as _cifar  # noqa: F401,E402  (registers "cifar10", "cifar100")
from raymia.data import digits as _digits  # noqa: F401,E402  (registers "digits")
from raymia.data import imagefolder as _imagefolder  # noqa: F401,E402  (registers "imagefolder")
from raymia.data import mnist as _mnist  # noqa: F401,E402  (registers "mnist", "fashion_mnist")
from raymia.data import npz as _npz  # noqa: F401,E402  (registers "npz")
from raymia.data import synthetic as _synthetic  # noqa: F401,E402  (registers "synthetic")
from raymia.data import tabular as _tabular  # noqa: F401,E402  (registers "purchase100", "texas100", "location30")
from raymia.data.registry import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
