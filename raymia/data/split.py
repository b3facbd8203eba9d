"""Splitting a data set by class (private vs public), and adapting another data set's inputs to a shape.

Model inversion asks what a PRIVATE class looks like, so the attacker's public data must hold other
classes (or come from another data set). `class_split` makes that split the data set itself: the training
split becomes the private classes' training points followed by the public classes' (`num_private` marks
the boundary), the test split keeps the private classes only. The membership plan then draws its audited
population from the first `num_private` points, so every bank model trains on private classes only, and
the training points outside the population (`defenses.base.public_indices`) are the public classes, the
only data a defense (TL-DMI's pretraining, a min-max reference set) or an inversion attacker fits on.
`drop_unaudited` removes the private training points the plan left out of the population, so they are
neither audited nor public. Labels keep their values: the model still has one output per class of the
data set (TL-DMI pretrains that head on the public classes).

`adapt_inputs` maps another data set's inputs to a target's input space: normalisation undone to pixels in
[0, 1], grey <-> RGB (channel mean / repetition), bilinear resize to the target's height and width (with
antialiasing), then the target's normalisation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from raymia.data.registry import Dataset
from raymia.datainfo import DataInfo
from raymia.errors import SpecError


def resolve_classes(private: int | list[int], public: list[int] | None, num_classes: int,
                    where: str = "data") -> tuple[list[int], list[int]]:
    """(private, public) class lists, checked: within [0, K), disjoint, both non-empty."""
    if isinstance(private, int) and not 1 <= private < num_classes:
        raise SpecError(f"{private} private classes leave no public class among the {num_classes} classes; "
                        f"accepted: 1..{num_classes - 1} or a list", where=f"{where}.private_classes")
    priv = list(range(private)) if isinstance(private, int) else [int(c) for c in private]
    for field, cls in (("private_classes", priv), ("public_classes", public or [])):
        bad = [c for c in cls if not 0 <= c < num_classes]
        if bad:
            raise SpecError(f"classes {bad} are outside [0, {num_classes})", where=f"{where}.{field}")
    pub = [c for c in range(num_classes) if c not in priv] if public is None else [int(c) for c in public]
    overlap = sorted(set(priv) & set(pub))
    if overlap:
        raise SpecError(f"classes {overlap} are both private and public; the attacker's public data must "
                        "hold other classes", where=f"{where}.public_classes")
    if not pub:
        raise SpecError("no public class is left; list fewer private classes", where=f"{where}.private_classes")
    return priv, pub


def class_split(data: Dataset, private: list[int], public: list[int]) -> tuple[Dataset, int]:
    """(the data set with training split = private points then public points and a private-only test
    split, the number of private training points). Within each part the original order is kept."""
    ytr, yte = data.y_train.numpy(), data.y_test.numpy()
    priv_idx = np.flatnonzero(np.isin(ytr, private))
    pub_idx = np.flatnonzero(np.isin(ytr, public))
    test_idx = np.flatnonzero(np.isin(yte, private))
    for what, idx in (("training", priv_idx), ("test", test_idx)):
        if idx.size == 0:
            raise SpecError(f"{data.name!r} has no {what} point of the private classes {private}",
                            where="data.private_classes")
    order = torch.from_numpy(np.concatenate([priv_idx, pub_idx]))
    t = torch.from_numpy(test_idx)
    view = replace(data, x_train=data.x_train[order], y_train=data.y_train[order], x_test=data.x_test[t],
                   y_test=data.y_test[t])
    return view, int(priv_idx.size)


def drop_unaudited(data: Dataset, population: np.ndarray, num_private: int) -> tuple[Dataset, np.ndarray]:
    """(the data set without the private training points outside `population`, the population's indices in
    it): private points the plan does not audit are neither audited nor public."""
    pop = np.asarray(population, dtype=np.int64)
    keep = torch.from_numpy(np.concatenate([pop, np.arange(num_private, data.x_train.shape[0])]))
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep]), np.arange(pop.size, dtype=np.int64)


def adapt_inputs(x: torch.Tensor, src: DataInfo, dst: DataInfo, where: str = "data") -> torch.Tensor:
    """Images x [N, C, H, W] normalised as `src` declares, as images of `dst`'s input shape and
    normalisation (float32)."""
    if src.kind != "image" or dst.kind != "image" or x.ndim != 4 or len(dst.input_shape) != 3:
        raise SpecError(f"only images can be adapted to another data set's inputs; got {src.kind} "
                        f"{tuple(x.shape[1:])} for {dst.kind} {tuple(dst.input_shape)}", where=where)
    c, h, w = (int(s) for s in dst.input_shape)
    px = src.to_pixels(x.float()).clamp(0, 1)
    if px.shape[1] != c:
        if px.shape[1] == 1:
            px = px.expand(-1, c, -1, -1)
        elif c == 1:
            px = px.mean(1, keepdim=True)
        else:
            raise SpecError(f"cannot map {px.shape[1]} channels to {c}", where=where)
    if tuple(px.shape[2:]) != (h, w):
        px = F.interpolate(px, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return dst.from_pixels(px).contiguous()
