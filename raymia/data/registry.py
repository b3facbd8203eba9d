"""The data set registry and the in-memory `Dataset` every loader returns."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch

from raymia.datainfo import DataInfo
from raymia.errors import DataError
from raymia.registry import Registry


@dataclass(frozen=True)
class Dataset:
    """Normalised float32 inputs and int64 labels for a training split and a test split.

    The training split is where the membership plan draws its audited population from; the test split is
    never trained on by any bank model and measures utility.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: DataInfo

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: {split} inputs and labels differ in length")
            if tuple(x.shape[1:]) != tuple(self.info.input_shape):
                raise ValueError(f"{self.name}: {split} inputs have shape {tuple(x.shape[1:])}, "
                                 f"expected {self.info.input_shape}")
            finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
            if not finite.all():  # training would diverge, and the error would blame the learning rate
                rows = torch.nonzero(~finite).reshape(-1)
                raise DataError(f"{len(rows)} {split} input(s) hold NaN or inf once normalised (row {int(rows[0])} "
                                "first); drop or fix them", where=f"data {self.name}")


DATASETS: Registry[Any] = Registry("data set", package="raymia.data")


# The spec's field that names the data set being loaded (`data`, `inversion.public`): a loader's hint names the
# parameter the user wrote, `param_field("root")`, whichever field that is.
_FIELD: ContextVar[str] = ContextVar("raymia_data_field", default="data")


def param_field(name: str) -> str:
    """The dotted spec field of the loading data set's parameter `name`, e.g. `inversion.public.params.root`."""
    return f"{_FIELD.get()}.params.{name}"


def load_dataset(name: str, params: dict[str, Any] | None = None, where: str = "data") -> Dataset:
    """The data set `name` with `params`; `where`: the spec's field that names it, for errors."""
    entry = DATASETS.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    token = _FIELD.set(where)
    try:
        ds = entry.obj(parsed)
    finally:
        _FIELD.reset(token)
    return replace(ds, info=replace(ds.info, name=name))
