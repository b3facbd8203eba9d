"""Scoring model-inversion (MI) reconstructions with an independent evaluation classifier.

The protocol of GMI / KED-MI / TL-DMI (REFERENCE 1.4, 3): an evaluation classifier of ANOTHER architecture
than the attacked model, trained on the private classes, judges every reconstruction of a class:

- `top1` / `top5`: the fraction of reconstructions whose evaluator top-1 / top-k prediction (k = min(5, C))
  contains the class the attack targeted;
- `knn_dist`: per reconstruction, the smallest L2 distance in the evaluator's feature space to the private
  images of its target class, averaged over the reconstructions;
- `fid`: the Frechet distance between Gaussian fits of the evaluator's features of all reconstructions and
  of all private images of the attacked classes. Inception-v3 weights cannot be downloaded here, so this is
  NOT the usual Inception FID: the features are the evaluation classifier's (see `features`), and its values
  are comparable only between runs scored by the same evaluator.

The features (`features`, `feature_layer`) are the evaluator's penultimate-layer activations: the input of
its LAST `nn.Linear` module (in `modules()` order, the classifier layer of raymia's `cnn` and `mlp`: for
`cnn` the 128-d ReLU output of the hidden fc layer, `classifier.2`'s input), captured with a forward
pre-hook in eval mode and flattened to [N, D].

`train_evaluator` trains the evaluator with raymia's model registry and step loop (seeded, Adam, plain
cross-entropy, no augmentation); `cached_evaluator` keeps its weights under a content key (the data's bytes
and every setting) with the cache helpers of `raymia.cache` (atomic write, checksum, read with
`torch.load(weights_only=True)`; a damaged file is refitted with a warning). `save_grid` draws
reconstructions as one PNG (matplotlib's Agg canvas, no pyplot state).

Pure PyTorch and numpy: no Ray, MLflow or Optuna.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raymia.cache import data_digest, key_digest, load_state, save_state
from raymia.datainfo import DataInfo
from raymia.device import resolve_device
from raymia.models import build_model
from raymia.seeding import derive_seed
from raymia.spec import TrainSpec
from raymia.storage import store_dir
from raymia.train.loop import member_batches, module_net, run_steps

log = logging.getLogger("raymia")

EVALUATOR_FORMAT = 1  # bump when the training of the evaluator changes (part of the cache key)


# ---------------------------------------------------------------------------------------------------------
# the evaluation classifier


def default_arch(input_shape: Sequence[int]) -> str:
    """`cnn` for images (C, H, W), `mlp` for anything else: architectures other than the usual targets."""
    return "cnn" if len(tuple(input_shape)) == 3 else "mlp"


def _check_data(x: torch.Tensor, y: torch.Tensor, num_classes: int, input_shape: Sequence[int]) -> None:
    if x.shape[0] == 0 or x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"evaluator data: {tuple(x.shape)} inputs and {tuple(y.shape)} labels do not match")
    if tuple(x.shape[1:]) != tuple(int(s) for s in input_shape):
        raise ValueError(f"evaluator data: inputs {tuple(x.shape[1:])}, expected {tuple(input_shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"evaluator data: labels outside [0, {num_classes})")


def _seeded(device: torch.device):
    """A forked RNG (CPU, and the CUDA device when training there): the caller's random state is untouched."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


def _build(arch: str, params: dict[str, Any] | None, num_classes: int, input_shape: Sequence[int],
           seed: int) -> nn.Module:
    """The untrained evaluator, initialised under derive_seed(seed, "evaluator", "init")."""
    shape = tuple(int(s) for s in input_shape)
    info = DataInfo(num_classes=num_classes, input_shape=shape, kind="image" if len(shape) == 3 else "tabular")
    torch.manual_seed(derive_seed(seed, "evaluator", "init"))
    return build_model(arch, params, info)


def train_evaluator(x: torch.Tensor, y: torch.Tensor, num_classes: int, input_shape: Sequence[int], *,
                    arch: str | None = None, params: dict[str, Any] | None = None, epochs: int = 30,
                    lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Train an evaluation classifier on the private data (x [N, *input_shape], y [N] in [0, num_classes)).

    `arch`/`params`: a model of raymia's registry (`raymia list models`); None picks `default_arch`
    (`cnn` for images, `mlp` for tabular data): choose one other than the attacked model's. Training: Adam at
    `lr` (constant), plain cross-entropy, `epochs` epochs of ceil(N / batch) full shuffled batches, no
    augmentation, on raymia's step loop (`run_steps`). Seeded: the initialisation with
    derive_seed(seed, "evaluator", "init") in a forked RNG, the batch order with
    derive_seed(seed, "evaluator", "order"). `device`: cpu, cuda or auto. Returns the model on `device`
    in eval mode.
    """
    _check_data(x, y, num_classes, input_shape)
    dev = resolve_device(str(device), where="evaluator.device")
    arch = arch or default_arch(input_shape)
    n = x.shape[0]
    batch = min(batch_size, n)
    per_epoch = -(-n // batch)
    recipe = TrainSpec(optimizer="adam", lr=lr, epochs=epochs, batch_size=batch)
    with _seeded(dev):
        model = _build(arch, params, num_classes, input_shape, seed).to(dev)
        xd, yd = x.detach().to(dev, torch.float32), y.detach().to(dev, torch.int64)
        batches = member_batches(xd, yd, recipe,
                                 torch.Generator().manual_seed(derive_seed(seed, "evaluator", "order")),
                                 torch.Generator())  # no augmentation: never drawn from
        model.train()
        run_steps(module_net(model), batches, lambda logits, yb, step: F.cross_entropy(logits, yb), recipe,
                  epochs * per_epoch, per_epoch, names=["evaluation classifier"], remedy="lower its lr")
    return model.eval()


class CachedEvaluator(NamedTuple):
    model: nn.Module  # on the device, eval mode
    path: Path  # the cache file
    from_cache: bool  # loaded (True) or trained and written (False)


def cached_evaluator(cache_dir: str | Path, key_parts: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                     num_classes: int, input_shape: Sequence[int], *, arch: str | None = None,
                     params: dict[str, Any] | None = None, epochs: int = 30, lr: float = 1e-3,
                     batch_size: int = 64, seed: int = 0,
                     device: str | torch.device = "cpu") -> CachedEvaluator:
    """`train_evaluator` once per content key, its state_dict kept at `<cache_dir>/evaluator-<key>.pt`.

    The key hashes (`key_digest`) the bytes and shapes of x and y (`data_digest`), every training setting,
    the device type (CUDA and CPU training differ in rounding), `EVALUATOR_FORMAT` and the caller's
    `key_parts` (JSON-able: e.g. the data set's name or the attack's setting). The file is written with
    `raymia.cache.save_state` (temp file in the same folder, fsynced, os.replace, a checksum of the
    tensors), and read with `load_state` (torch.load(weights_only=True), key and checksum checked); a
    damaged, foreign or ill-fitting file is logged as a warning and refitted.
    """
    _check_data(x, y, num_classes, input_shape)
    dev = resolve_device(str(device), where="evaluator.device")
    arch = arch or default_arch(input_shape)
    data = data_digest(SimpleNamespace(name="evaluator", x_train=x, y_train=y))
    key = key_digest({"format": EVALUATOR_FORMAT, "data": data, "arch": arch, "params": params or {},
                      "num_classes": num_classes, "input_shape": [int(s) for s in input_shape],
                      "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                      "device": dev.type, "parts": key_parts})
    path = store_dir(cache_dir) / f"evaluator-{key}.pt"
    state = load_state(path, key)
    if state is not None:
        with _seeded(dev):
            model = _build(arch, params, num_classes, input_shape, seed)
        try:
            model.load_state_dict(state)
            return CachedEvaluator(model.to(dev).eval(), path, True)
        except (RuntimeError, ValueError) as e:
            log.warning("cache %s does not fit the evaluator (%s); refitting", path, e)
    model = train_evaluator(x, y, num_classes, input_shape, arch=arch, params=params, epochs=epochs, lr=lr,
                            batch_size=batch_size, seed=seed, device=dev)
    save_state(path, key, model.state_dict())
    return CachedEvaluator(model, path, False)


# ---------------------------------------------------------------------------------------------------------
# features and scores


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the last nn.Linear registered in `model`: its input is the penultimate features."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return found[-1]


def feature_layer(evaluator: nn.Module) -> str:
    """Which features `features` returns, in words (for reports): the input of the last nn.Linear."""
    name, lin = last_linear(evaluator)
    return f"input of {name or type(evaluator).__name__} (Linear {lin.in_features}->{lin.out_features})"


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    t = t if t is not None else next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def _run(evaluator: nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], features [N, D]) of x in eval mode, on the CPU in float32 (the module's mode restored)."""
    if x.shape[0] == 0:
        raise ValueError("no inputs to evaluate")
    _, layer = last_linear(evaluator)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    device, was_training = _device_of(evaluator), evaluator.training
    evaluator.eval()
    logits, feats = [], []
    try:
        for chunk in x.split(batch):
            captured.clear()
            out = evaluator(chunk.to(device, torch.float32))
            if len(captured) != 1:
                raise ValueError(f"the evaluator's last nn.Linear ran {len(captured)} times in one forward pass")
            logits.append(out.float().cpu())
            feats.append(captured[0].flatten(1).float().cpu())
    finally:
        handle.remove()
        evaluator.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def features(evaluator: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The evaluator's penultimate-layer features of x: [N, D] float32 on the CPU, D the in_features of its
    last nn.Linear (`feature_layer`), computed in eval mode in chunks of `batch`."""
    return _run(evaluator, x, batch)[1]


def _fit_gaussian(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = f.double().numpy()
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below 0, rounding, clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), in float64.

    tr(sqrtm(sigma1 sigma2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(sigma1) sigma2 sqrt(sigma1), which has the same eigenvalues as sigma1 sigma2: exact also when a
    covariance is singular (fewer points than feature dimensions, or a feature that never varies), where
    pytorch-fid's scipy.linalg.sqrtm of the product is computed as it is and its eps * I offset is only a
    fallback for a non-finite result. Adding eps * I to both covariances instead changes the value by about
    2 sqrt(eps lambda) per direction that one covariance lacks, which is not small against features of small
    variance (the distance would then not scale with the features' scale squared). Scalars are 1-D
    Gaussians (sigma a variance). Clipped at 0 (rounding)."""
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: means {m1.shape}, {m2.shape} and covariances {s1.shape}, "
                         f"{s2.shape} do not match")
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return max(float(value), 0.0)


def _check_scores(recon: torch.Tensor, t: torch.Tensor, private_x: torch.Tensor, private_y: torch.Tensor,
                  k: int) -> None:
    if t.ndim != 1 or t.shape[0] != recon.shape[0] or t.shape[0] == 0:
        raise ValueError(f"target_labels {tuple(t.shape)} must be one label per reconstruction {tuple(recon.shape)}")
    if private_y.ndim != 1 or private_y.shape[0] != private_x.shape[0]:
        raise ValueError(f"private_y {tuple(private_y.shape)} must be one label per private image {tuple(private_x.shape)}")
    if tuple(recon.shape[1:]) != tuple(private_x.shape[1:]):
        raise ValueError(f"reconstructions {tuple(recon.shape[1:])} and private images {tuple(private_x.shape[1:])} differ in shape")
    if t.is_floating_point() or private_y.is_floating_point() or k < 1:
        raise ValueError("labels must be integers and k >= 1")


def score_reconstructions(evaluator: nn.Module, recon: torch.Tensor, target_labels: torch.Tensor,
                          private_x: torch.Tensor, private_y: torch.Tensor, k: int = 5,
                          batch: int = 256, told_apart: int | None = None) -> dict[str, Any]:
    """Score reconstructions recon [n, ...] of the classes target_labels [n] against the private data.

    Returns `top1` and `top{k}` (default `top5`; nan when the evaluator tells k classes or fewer apart:
    `told_apart`, by default its outputs; an evaluator trained on the private classes only ranks them first,
    so with k of them or fewer the accuracy would be 1 whatever the reconstructions),
    `knn_dist` (mean over reconstructions of the squared minimum L2 distance, in evaluator feature space,
    to the private images of its target class, as KED-MI's, PLG-MI's and LOMMA's / TL-DMI's evaluation code
    compute it: 0, up to float rounding, for a copy of one), `fid` (the Frechet
    distance between the Gaussian fits of the evaluator features of all reconstructions and of all private
    images of the attacked classes; NOT Inception features; nan when either set has fewer than 2 points),
    `n` (reconstructions), `n_private` (private images of the attacked classes), `feature_dim` and
    `features` (`feature_layer`). Every target class must have private images.
    """
    t, py = torch.as_tensor(target_labels).cpu(), torch.as_tensor(private_y).cpu()
    _check_scores(recon, t, private_x, py, k)
    logits, fr = _run(evaluator, recon, batch)
    c = logits.shape[1]
    if int(t.min()) < 0 or int(t.max()) >= c or int(py.min()) < 0 or int(py.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}), the evaluator's classes")
    classes = torch.unique(t)
    missing = [int(v) for v in classes if not bool((py == v).any())]
    if missing:
        raise ValueError(f"classes {missing} have no private images to compare with")
    mask = torch.isin(py, classes)
    fp, yp = _run(evaluator, private_x[mask.to(private_x.device)], batch)[1], py[mask]
    top1 = (logits.argmax(1) == t).double().mean().item()
    told_apart = c if told_apart is None else told_apart
    hit = (logits.topk(min(k, c), dim=1).indices == t[:, None]).any(1)
    topk = hit.double().mean().item() if told_apart > k else math.nan
    dist = torch.empty(t.shape[0], dtype=torch.float64)
    for v in classes:
        r = t == v
        dist[r] = torch.cdist(fr[r].double(), fp[yp == v].double(),
                              compute_mode="donot_use_mm_for_euclid_dist").min(1).values.square()
    fid = math.nan
    if fr.shape[0] >= 2 and fp.shape[0] >= 2:
        fid = frechet_distance(*_fit_gaussian(fr), *_fit_gaussian(fp))
    return {"top1": top1, f"top{k}": topk, "knn_dist": dist.mean().item(), "fid": fid, "n": int(t.shape[0]),
            "n_private": int(fp.shape[0]), "feature_dim": int(fr.shape[1]), "features": feature_layer(evaluator)}


# ---------------------------------------------------------------------------------------------------------
# image grids


def _to_unit(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1]: normalisation undone (x * std + mean per channel) when given, clipped."""
    x = images.detach().cpu().double()
    c = x.shape[1]
    if (mean is None) != (std is None):
        raise ValueError("save_grid: give both mean and std, or neither")
    if mean is not None and std is not None:
        m, s = torch.tensor(mean, dtype=x.dtype), torch.tensor(std, dtype=x.dtype)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise ValueError(f"save_grid: mean/std need 1 or {c} values")
        x = x * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)
    x = x.clamp(0.0, 1.0).permute(0, 2, 3, 1)
    return (x.expand(-1, -1, -1, 3) if c == 1 else x).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, labels: Sequence[Any] | None = None, *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              scale: int | None = None, pad: int = 2, dpi: int = 100) -> Path:
    """Write images [N, C, H, W] (C = 1 or 3) as one PNG grid of `nrow` images per row; returns the path.

    Pixels are in [0, 1], or normalised with per-channel `mean`/`std` (pass them to undo it: DataInfo's);
    values are clipped to [0, 1]. Each image is enlarged by `scale` (default: the integer factor that makes
    its longer side at least 64 px; nearest neighbour), cells are separated by `pad` white pixels, and with
    `labels` (one per image) a band above every row carries each image's label. The PNG's pixel size is the
    grid's exactly: width nrow' x (W x scale + pad) + pad, nrow' = min(nrow, N) (matplotlib's Agg canvas).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0 or nrow < 1:
        raise ValueError(f"save_grid: expected images [N, 1 or 3, H, W] and nrow >= 1, got {tuple(images.shape)}")
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(f"save_grid: {len(labels)} labels for {images.shape[0]} images")
    n, _, h, w = images.shape
    s = scale or max(1, math.ceil(64 / max(h, w)))
    cols, rows = min(nrow, n), -(-n // nrow)
    band = 16 if labels is not None else 0
    ch, cw = band + h * s + pad, w * s + pad  # one cell with its band and its right/bottom padding
    grid = np.ones((rows * ch + pad, cols * cw + pad, 3))
    pix = _to_unit(images, mean, std).repeat(s, axis=1).repeat(s, axis=2)
    fig = Figure(figsize=(grid.shape[1] / dpi, grid.shape[0] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    for i in range(n):
        top, left = pad + (i // nrow) * ch + band, pad + (i % nrow) * cw
        grid[top:top + h * s, left:left + w * s] = pix[i]
        if labels is not None:
            ax.text(left + w * s / 2, top - band / 2, str(labels[i]), ha="center", va="center",
                    fontsize=band * 0.55 * 72 / dpi, clip_on=True)
    ax.imshow(grid, interpolation="nearest", extent=(0, grid.shape[1], grid.shape[0], 0))
    ax.set_axis_off()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


__all__ = ["EVALUATOR_FORMAT", "CachedEvaluator", "cached_evaluator", "default_arch", "feature_layer", "features",
           "frechet_distance", "save_grid", "score_reconstructions", "train_evaluator"]
