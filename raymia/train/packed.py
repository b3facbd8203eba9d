"""Packed execution: K models of one sequential architecture run as a few large kernels, without vmap.

`torch.func.vmap` over `functional_call` runs any architecture as a pack, but its batching rules move the
model dimension into the channel dimension before every convolution and back out after it (a copy each
way, in NCHW), and pooling and activations run on the model-major copy. For models that are a plain stack
of layers (nn.Sequential, nested, of the leaf types below: the MLP, LeNet-5 and the small CNN of the
registry), `PackedSequential` walks the layers itself and keeps the pack's activations in one of four
layouts:

  stack   [K*B, C, H, W]                 the input as it arrives (one batch per model, model-major)
  group   [B, K*C, H, W] channels_last   a convolution is one grouped convolution (groups x K),
                                         BatchNorm2d one call over K*C channels (per-model statistics),
                                         pooling and activations one call each
  split   K maps [B, C, H, W] (channels_last on a CPU): each layer runs once per model. On a CPU a
                                         convolution whose per-model output is large (SPLIT_MIN_OUTPUT)
                                         runs split: grouped convolutions are then memory-bound and
                                         slower than K ordinary ones, whose maps stay in cache through
                                         their pooling; small maps (LeNet-5) run grouped
  dense   [K, B, F]                      after Flatten, stored feature-major ([K, F, B] transposed): a
                                         Linear is one batched matmul y^T = W x^T, whose weight gradient
                                         comes out in the weight's own layout

A ReLU directly followed by a MaxPool2d runs as pool-then-ReLU: the two commute exactly (ReLU is
monotone, and its gradient is zero wherever the pooled maximum is not positive), and the ReLU then
touches a quarter of the values. Parameters and buffers live in the same stacked dictionaries as the
vmap pack (`params[name][k]` is model k's tensor under the model's own name), so the optimizer, the
parity tests and `member(k)` see no difference. Architectures outside this set (residual networks, VGG's
own forward, a defense's wrapper) keep the vmap pack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymia.models.base import Scale

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Hardswish,
               nn.Dropout, nn.Identity, Scale)
SPATIAL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def sequential_leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """The layers of a (nested) nn.Sequential in execution order with their qualified names, or None if the
    module is anything else or holds a layer `PackedSequential` cannot run."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            sub = sequential_leaves(child, f"{prefix}{name}.")
            if sub is None:
                return None
            out += sub
        return out
    name = prefix[:-1]
    if isinstance(module, nn.Conv2d):
        return [(name, module)] if module.padding_mode == "zeros" else None
    if isinstance(module, nn.Flatten):
        return [(name, module)] if (module.start_dim, module.end_dim) == (1, -1) else None
    if isinstance(module, (nn.Linear, nn.BatchNorm2d, *ELEMENTWISE, *SPATIAL)):
        return [(name, module)]
    return None


def _reorder(leaves: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """ReLU followed by MaxPool2d -> MaxPool2d followed by ReLU (an exact identity, values and gradients)."""
    out = list(leaves)
    i = 0
    while i < len(out) - 1:
        a, b = out[i][1], out[i + 1][1]
        if type(a) is nn.ReLU and isinstance(b, nn.MaxPool2d):
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return out


# Per-model output elements from which a convolution on a CPU runs as K ordinary convolutions.
SPLIT_MIN_OUTPUT = 1 << 20


class _Act:
    """The pack's activation in one of four layouts (see the module docstring)."""

    def __init__(self, kind: str, value, k: int, b: int):
        self.kind, self.value, self.k, self.b = kind, value, k, b


class PackedSequential:
    """Runs K stacked copies of one sequential architecture. Construct with `maybe_packed`."""

    def __init__(self, base: nn.Module, leaves: list[tuple[str, nn.Module]], params: dict, buffers: dict, k: int,
                 channels_last: bool):
        self.base, self.leaves, self.params, self.buffers, self.k = base, _reorder(leaves), params, buffers, k
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.training = True

    def _tensor(self, key: str) -> torch.Tensor | None:
        """A stacked parameter, or a stacked buffer for a frozen one (`raymia.models.base.freeze`)."""
        t = self.params.get(key)
        return self.buffers.get(key) if t is None else t

    # layout conversions ------------------------------------------------------------------------------
    def _group(self, a: _Act) -> torch.Tensor:
        if a.kind == "group":
            return a.value
        if a.kind == "split":
            return torch.cat(a.value, dim=1).contiguous(memory_format=self.fmt)
        if a.kind == "stack":
            x = a.value
            x = x.reshape(a.k, a.b, *x.shape[1:]).transpose(0, 1).reshape(a.b, a.k * x.shape[1], *x.shape[2:])
            return x.contiguous(memory_format=self.fmt)
        raise ValueError("a convolution or BatchNorm2d after Flatten: the pack needs image activations here")

    def _split(self, a: _Act) -> list[torch.Tensor]:
        if a.kind == "split":
            return a.value
        if a.kind == "stack":
            return [x.contiguous(memory_format=self.fmt) for x in a.value.split(a.b)]
        if a.kind == "group":
            x = a.value
            return [t.contiguous(memory_format=self.fmt) for t in x.reshape(a.b, a.k, -1, *x.shape[2:]).unbind(1)]
        raise ValueError("a convolution or BatchNorm2d after Flatten: the pack needs image activations here")

    def _dense(self, a: _Act) -> torch.Tensor:
        """[K, B, F], each model's features in its own Flatten order (C, H, W)."""
        if a.kind == "dense":
            return a.value
        if a.kind == "split":
            return torch.stack([t.reshape(a.b, -1).t() for t in a.value]).transpose(1, 2)
        if a.kind == "stack":
            return a.value.reshape(a.k, a.b, -1)
        x = a.value  # group [B, K*C, H, W] -> feature-major [K, C*H*W, B], returned transposed
        x = x.reshape(a.b, a.k, -1, *x.shape[2:]).permute(1, 2, 3, 4, 0).reshape(a.k, -1, a.b)
        return x.transpose(1, 2)

    # layers ------------------------------------------------------------------------------------------
    def _conv(self, name: str, m: nn.Conv2d, a: _Act) -> _Act:
        w = self._tensor(f"{name}.weight")  # [K, O, I/g, kh, kw]
        bias = self._tensor(f"{name}.bias")
        if self._per_model(m, a):
            outs = [F.conv2d(x, w[i], None if bias is None else bias[i], m.stride, m.padding, m.dilation, m.groups)
                    for i, x in enumerate(self._split(a))]
            return _Act("split", outs, a.k, a.b)
        x = self._group(a)
        y = F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1), m.stride,
                     m.padding, m.dilation, m.groups * a.k)
        return _Act("group", y, a.k, a.b)

    def _per_model(self, m: nn.Conv2d, a: _Act) -> bool:
        """Run this convolution as K ordinary ones (split) rather than one grouped one. On a CPU the grouped
        convolution wins while a model's output map is small (the K small calls are overhead-bound) and
        loses once it is large (memory-bound: each model's map then stays in cache through its pooling);
        the switch is at SPLIT_MIN_OUTPUT elements per model (measured in benchmarks/RESULTS.md). On CUDA
        every convolution is grouped: K launches per layer would undo the pack."""
        x = a.value[0] if a.kind == "split" else a.value
        if x.device.type != "cpu":
            return False
        h, w = x.shape[-2:]
        if isinstance(m.padding, str):
            oh, ow = (h, w) if m.padding == "same" else (h - m.dilation[0] * (m.kernel_size[0] - 1),
                                                           w - m.dilation[1] * (m.kernel_size[1] - 1))
        else:
            oh = (h + 2 * m.padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1) // m.stride[0] + 1
            ow = (w + 2 * m.padding[1] - m.dilation[1] * (m.kernel_size[1] - 1) - 1) // m.stride[1] + 1
        return a.b * m.out_channels * oh * ow >= SPLIT_MIN_OUTPUT

    def _batch_norm(self, name: str, m: nn.BatchNorm2d, a: _Act) -> _Act:
        rm, rv = self.buffers.get(f"{name}.running_mean"), self.buffers.get(f"{name}.running_var")
        w, b = self._tensor(f"{name}.weight"), self._tensor(f"{name}.bias")
        factor = 0.0 if m.momentum is None else m.momentum
        if self.training and m.track_running_stats and rm is not None:  # as nn.BatchNorm2d.forward
            tracked = self.buffers[f"{name}.num_batches_tracked"]
            tracked.add_(1)
            if m.momentum is None:
                factor = 1.0 / float(tracked[0])
        use_batch = self.training or rm is None
        track = not self.training or m.track_running_stats
        rm, rv = (rm, rv) if track else (None, None)
        if a.kind == "split":  # per model; the statistics update in place through views of the stack
            outs = [F.batch_norm(x, None if rm is None else rm[i], None if rv is None else rv[i],
                                 None if w is None else w[i], None if b is None else b[i], use_batch, factor, m.eps)
                    for i, x in enumerate(a.value)]
            return _Act("split", outs, a.k, a.b)
        y = F.batch_norm(self._group(a), None if rm is None else rm.view(-1), None if rv is None else rv.view(-1),
                         None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                         use_batch, factor, m.eps)
        return _Act("group", y, a.k, a.b)

    def _linear(self, name: str, a: _Act) -> _Act:
        x = a.value  # dense: `_check_layouts` admits Linear only after Flatten or on flat inputs
        w, b = self._tensor(f"{name}.weight"), self._tensor(f"{name}.bias")  # [K, O, I], [K, O]
        # Computed feature-major, y^T = W x^T: the weight gradient then comes out in the weight's own
        # layout (no transposed copy per step), and chained layers pass contiguous [K, F, B] blocks.
        xt = x.transpose(1, 2)
        yt = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
        return _Act("dense", yt.transpose(1, 2), a.k, a.b)

    def _apply(self, m: nn.Module, a: _Act) -> _Act:
        """A layer that acts on every model's values alike (activation, dropout, pooling)."""
        if isinstance(m, SPATIAL) and a.kind == "dense":
            raise ValueError(f"{type(m).__name__} after Flatten: the pack needs image activations here")
        if a.kind == "split":
            return _Act("split", [m(x) for x in a.value], a.k, a.b)
        return _Act(a.kind, m(a.value), a.k, a.b)

    # the model ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PackedSequential:
        self.training = mode
        self.base.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [K, B, ...] one batch per model. Returns logits [K, B, C]."""
        k, b = x.shape[0], x.shape[1]
        a = _Act("stack", x.reshape(k * b, *x.shape[2:]), k, b) if x.ndim == 5 else _Act("dense", x, k, b)
        for name, m in self.leaves:
            if isinstance(m, nn.Conv2d):
                a = self._conv(name, m, a)
            elif isinstance(m, nn.BatchNorm2d):
                a = self._batch_norm(name, m, a)
            elif isinstance(m, nn.Linear):
                a = self._linear(name, a)
            elif isinstance(m, nn.Flatten):
                a = _Act("dense", self._dense(a), k, b)
            else:
                a = self._apply(m, a)
        return self._dense(a)


def _check_layouts(leaves: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]) -> bool:
    """Whether every layer sees the kind of activation it needs: convolutions, BatchNorm2d and pooling
    image maps [C, H, W], Linear flat features (after Flatten, or flat inputs)."""
    if len(input_shape) == 3:
        kind = "image"
    elif len(input_shape) == 1:
        kind = "flat"
    else:
        return False
    for _, m in leaves:
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *SPATIAL)) and kind != "image":
            return False
        if isinstance(m, nn.Linear) and kind != "flat":
            return False
        if isinstance(m, nn.Flatten):
            kind = "flat"
    return kind == "flat"


def runs_packed(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether packs of this architecture run as a `PackedSequential` (else with vmap)."""
    leaves = sequential_leaves(model)
    return bool(leaves) and _check_layouts(leaves, tuple(input_shape))


def maybe_packed(base: nn.Module, params: dict, buffers: dict, k: int, input_shape: tuple[int, ...],
                 channels_last: bool) -> PackedSequential | None:
    """A `PackedSequential` for this architecture and input shape (one example, no batch dimension), or
    None when it is not a plain stack of supported layers ending in flat logits (ResNets, VGG's custom
    forward, a defense's wrapper): those packs run with vmap."""
    if not runs_packed(base, input_shape):
        return None
    return PackedSequential(base, sequential_leaves(base), params, buffers, k, channels_last)
