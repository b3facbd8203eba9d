"""The model registry and the helpers its builders share.

A builder is `fn(params, info) -> nn.Module` returning logits [N, info.num_classes]. Models must be
usable by the model bank, which stacks K copies with torch.func.stack_module_state and runs them with
torch.func.vmap(functional_call) on a 'meta' base copy, so builders:

- do all initialisation inside the constructor (deterministic under torch.manual_seed) and no real
  computation on tensors (they must also build under `with torch.device("meta")`);
- use no in-place activations (`inplace_off` clears them on torchvision modules) and no Dropout unless a
  parameter asks for it (vmap then needs randomness="different" or "same");
- raise SpecError(where="model.name") with a one-line message when the data does not fit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raymia.datainfo import DataInfo
from raymia.errors import SpecError, first_line
from raymia.registry import Registry

MODELS: Registry[Any] = Registry("model", package="raymia.models")


def build_model(name: str, params: dict[str, Any] | None, info: DataInfo) -> nn.Module:
    entry = MODELS.get(name, where="model.name")
    return entry.obj(entry.parse(params, where="model.params"), info)


def check_forward(name: str, params: dict[str, Any] | None, info: DataInfo, where: str = "model.name") -> None:
    """Build the model on the meta device (as the bank does), then on the CPU, and run two inputs of the
    data's shape through the CPU copy: a model that does not accept them, or does not return logits
    [N, num_classes], is one SpecError before any training. The forward pass runs on the CPU because on the
    meta device it would import torch's Python decompositions and dynamo, about 1.5 s of every sweep's
    start, where a CPU build and forward take milliseconds for the bundled models (0.2 s for VGG-16)."""
    params_where = (where.rpartition(".")[0] if where.endswith((".name", ".model")) else where) + ".params"
    try:
        with torch.device("meta"):
            meta = build_model(name, params, info)
    except SpecError as e:  # a builder's own check (e.g. the smallest image it takes), under the caller's field
        if where == "model.name" or not (e.where or "").startswith("model."):
            raise
        raise SpecError(str(e).removeprefix(f"{e.where}: "), where=where) from None
    except RuntimeError as e:  # sizes whose tensors torch cannot even describe (a typo's extra zeros)
        raise SpecError(f"model {name!r} cannot be built: {first_line(e)}", where=params_where) from None
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random stream stays as it was
        try:
            model = build_model(name, params, info)
        except (RuntimeError, MemoryError):  # widths that no machine holds
            n = sum(p.numel() for p in meta.parameters())
            raise SpecError(f"model {name!r} has {n:,} parameters ({4 * n / 2**30:.3g} GiB in float32), more than "
                            "this machine can allocate; accepted: smaller widths", where=params_where) from None
        x = torch.zeros(2, *info.input_shape)
        try:
            out = model.eval()(x)
        except Exception as e:  # whatever the user's forward raises: one line naming the model and the shape
            raise SpecError(f"model {name!r} does not accept the data's inputs of shape {list(info.input_shape)}: "
                            f"{first_line(e)}", where=where) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"model {name!r} returns {got} for 2 inputs; expected logits [2, {info.num_classes}]",
                        where=where)


def image_shape(info: DataInfo, model: str, min_size: int = 1) -> tuple[int, int, int]:
    """(C, H, W) of an image data set, or a SpecError naming the model and the shape it expects."""
    shape = tuple(int(s) for s in info.input_shape)
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < min_size:
        need = "(C, H, W)" + (f" with H, W >= {min_size}" if min_size > 1 else "")
        raise SpecError(
            f"model {model!r} expects image inputs of shape {need}; the data's input shape is {shape}",
            where="model.name",
        )
    return shape  # type: ignore[return-value]


def inplace_off(model: nn.Module) -> nn.Module:
    """Set `inplace=False` on every module that has the flag (torchvision builds ReLU(inplace=True))."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


def init_conv_bn(model: nn.Module) -> None:
    """torchvision's ResNet/VGG initialisation: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Scale(nn.Module):
    """Multiplies its input by a constant (airbench's scaling of the logits)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def freeze(module: nn.Module, name: str) -> None:
    """Turn parameter `name` of `module` into a buffer holding the same value: no optimizer sees it, yet
    it stays in the state dict under its name, stacks with a pack's buffers and is saved with the model."""
    value = getattr(module, name).detach()
    delattr(module, name)
    module.register_buffer(name, value)


def param_lr_scales(model: nn.Module) -> dict[str, float]:
    """Learning-rate multipliers that a model declares for some of its parameters, by qualified name: a
    module may carry `lr_scales = {param_name: factor}` (airbench's BatchNorm biases). The optimizer gives
    such a parameter lr x factor and weight decay / factor, so its decay per step is unchanged."""
    out: dict[str, float] = {}
    for prefix, m in model.named_modules():
        for pname, factor in getattr(m, "lr_scales", {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = float(factor)
    return out


def param_train_epochs(model: nn.Module) -> dict[str, int]:
    """Epoch limits that a model declares for some of its parameters, by qualified name: a module may carry
    `train_epochs = {param_name: epochs}` (airbench's whitening bias: 3). Such a parameter trains for that
    many epochs and then stays as it is (its optimizer group's lr is held at 0)."""
    out: dict[str, int] = {}
    for prefix, m in model.named_modules():
        for pname, epochs in getattr(m, "train_epochs", {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = int(epochs)
    return out


def data_init_modules(model: nn.Module) -> list[nn.Module]:
    """Modules initialised from the model's own training inputs (they define `init_from_data(x)`)."""
    return [m for m in model.modules() if callable(getattr(m, "init_from_data", None))]
