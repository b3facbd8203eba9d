"""Non-member sets swapped in for the held-out data: out-of-distribution and GAN-generated inputs
(Hintersdorf et al., "To Trust or Not To Trust Prediction Scores for Membership Inference Attacks",
IJCAI 2022; official code github.com/ml-research/To-Trust-or-Not-To-Trust-Prediction-Scores-for-Membership-
Inference-Attacks: utils/dataset_utils.py, experiments/cifar10_experiments.py, datasets/fake_cifar10.py).

`build_nonmembers(name, params, data, public_index, n, seed, cache_dir, device)` returns `NonMembers`: n
inputs float32 [n, *input_shape] in the data set's NORMALISED input space (what the models read), labels
int64 [n] in [0, num_classes) and how the labels were obtained (`label_source`). The sets, registered in
`NONMEMBER_SETS` with their parameters:

- `permuted`: test images whose pixel positions are permuted, a fresh permutation per image, the same for
  all channels of the image (the paper's `permute_pixels`, called per image); `per_image: false` uses one
  permutation for every image. Labels: the source images' labels ("source").
- `scaled`: test images x `factor` (255) AFTER normalisation (the paper's `create_scaled_dataset`). Labels:
  source.
- `unnormalized`: test images with the normalisation undone, raw pixels in [0, 1] fed as if normalised (the
  paper's `create_un_normalized_dataset`). Labels: source. A data set without normalisation (`info.mean` is
  None) would give the test split itself: refused.
- `uniform`: pixels U(0, 1), then normalised; `gaussian`: pixels N(0.5, sigma^2) clipped to [0, 1], then
  normalised (data sets without normalisation get the pixels as they are, as `DataInfo.random_inputs`).
  Labels: uniformly random classes ("random"). Not in the paper; the usual noise baselines.
- `dataset`: another registered data set's test (or training) split, its images mapped to the input shape
  and normalisation by `raymia.data.split.adapt_inputs`. Labels: random (its classes are not the
  target's). Refused when its images are not images, or when it shares an image with the audited data
  (the audited data set itself, or another split of it, is not out of distribution).
- `gan`: class-conditional fakes of a conditional GAN trained on the PUBLIC split (`data.x_train[public_index]`
  with their true labels): plgmi.py's ConditionalGenerator and ProjectionDiscriminator, hinge loss, PLG-MI's
  loop without its target term (G once, then D `n_critic` times; Adam betas (0, 0.9); real batches drawn with
  replacement, with U(0, 1/256) dequantisation noise; fake labels drawn as the labels of random public
  points). Fakes: class c = classes[i mod k] for i < n over the k classes present in the public split (all
  classes when each has a public point); labels = the conditioning class ("conditional"). Cached as
  `ood-cgan-<key>.pt` in `cache_dir` (key: the public inputs' and labels' bytes, the input shape,
  normalisation and class count, every setting but `checkpoint_every`, the seed, the device type), with a
  resumable checkpoint `ood-cgan-<key>.ckpt.pt` every `checkpoint_every` steps: gan.py's helpers.

The test-split sets (`permuted`, `scaled`, `unnormalized`) transform the SAME test images, the first n of one
seeded permutation of the test split (`pick_test_images`), as the paper's three sets all transform its one
non-member sample. Tabular data (`info.kind != "image"`): `permuted` permutes each row's features,
`scaled` multiplies the features, `uniform` and `gaussian` draw each feature over the training split's range
[min, max] (U(0, 1) or clipped N(0.5, sigma^2) mapped onto it); `unnormalized`, `dataset` and `gan` are
refused in one line. Every random draw comes from `derive_seed(seed, "ood", ...)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from raymia.data.registry import Dataset, load_dataset
from raymia.data.split import adapt_inputs
from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.registry import MAX_STEPS, NoParams, Params, Registry
from raymia.seeding import derive_seed
from raymia.storage import store_dir

if TYPE_CHECKING:
    from raymia.inversion.plgmi import ConditionalGenerator, ProjectionDiscriminator

log = logging.getLogger("raymia")

LabelSource = Literal["source", "random", "conditional"]


@dataclass(frozen=True)
class NonMembers:
    """n non-members: `x` float32 [n, *input_shape] in the normalised input space, `y` int64 [n] in
    [0, num_classes), `label_source`: "source" (the transformed test images' labels), "random" (uniform
    classes) or "conditional" (the GAN's conditioning class); `source_index`: for the sets made from a
    split's images, their indices in that split (the audited data's test split, or the other data set's
    split for `dataset`), else None."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    label_source: LabelSource
    source_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"non-member set {self.name!r}: x {self.x.dtype} {tuple(self.x.shape)}, "
                             f"y {self.y.dtype} {tuple(self.y.shape)}")


@dataclass(frozen=True)
class SetContext:
    """What a set's function gets: the audited data, the public split, how many, the seed, where to cache,
    the device (the GAN's), and `where` (the spec field, for messages)."""

    name: str
    data: Dataset
    public_index: np.ndarray
    n: int
    seed: int
    cache_dir: Path
    device: torch.device
    where: str

    @property
    def info(self) -> DataInfo:
        return self.data.info

    @property
    def image(self) -> bool:
        return self.data.info.kind == "image"

    def generator(self, *role: object) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, "ood", self.name, *role))

    def image_only(self) -> None:
        if not self.image:
            raise SpecError(f"non-member set {self.name!r} needs images; the data are {self.info.kind} "
                            f"{tuple(self.info.input_shape)}", where=f"{self.where}.name")

    def random_labels(self) -> torch.Tensor:
        return torch.randint(self.info.num_classes, (self.n,), generator=self.generator("labels"))


SetFn = Callable[[SetContext, Any], NonMembers]

NONMEMBER_SETS: Registry[SetFn] = Registry("non-member set", package="raymia.data.ood")


def build_nonmembers(name: str, params: dict[str, Any] | None, data: Dataset, public_index: np.ndarray, n: int,
                     seed: int, cache_dir: Path, device: torch.device, where: str = "ood") -> NonMembers:
    """The non-member set `name` with `params` (validated: one-line SpecError naming `where.params`) for
    `data`: n inputs in the normalised input space and their labels (see the module docstring)."""
    entry = NONMEMBER_SETS.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise SpecError(f"the number of non-members must be a positive integer; got {n!r}", where=where)
    ctx = SetContext(name, data, np.asarray(public_index, dtype=np.int64).reshape(-1), int(n), int(seed),
                     cache_dir, torch.device(device), where)
    out = entry.obj(ctx, parsed)
    shape = (ctx.n, *data.info.input_shape)
    if tuple(out.x.shape) != shape or tuple(out.y.shape) != (ctx.n,):
        raise ValueError(f"non-member set {name!r} returned x {tuple(out.x.shape)}, y {tuple(out.y.shape)}; "
                         f"expected {shape} and ({ctx.n},)")
    return out


def pick_test_images(data: Dataset, n: int, seed: int, where: str = "ood") -> np.ndarray:
    """The test images the test-split sets transform: the first n of a permutation of the test split drawn
    from derive_seed(seed, "ood", "test") (the same images for `permuted`, `scaled` and `unnormalized`)."""
    return _pick(data.x_test.shape[0], n, derive_seed(seed, "ood", "test"), "the test split", where)


def _pick(size: int, n: int, seed: int, what: str, where: str) -> np.ndarray:
    if n > size:
        raise SpecError(f"{n} non-members asked for (ood.size), but {what} holds {size} inputs; accepted: an "
                        f"ood.size of at most {size}", where=where)
    return np.random.default_rng(seed).permutation(size)[:n].astype(np.int64)


def _from_test(ctx: SetContext, transform: Callable[[torch.Tensor], torch.Tensor]) -> NonMembers:
    idx = pick_test_images(ctx.data, ctx.n, ctx.seed, ctx.where)
    t = torch.from_numpy(idx)
    x = transform(ctx.data.x_test[t].float())
    return NonMembers(ctx.name, x.float().contiguous(), ctx.data.y_test[t].long().clone(), "source", idx)


def _feature_range(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = data.x_train.float()
    return x.amin(0, keepdim=True), x.amax(0, keepdim=True)


def _generated(ctx: SetContext, unit: torch.Tensor) -> NonMembers:
    """Values in [0, 1] [n, *shape] as inputs: pixels normalised (images) or mapped onto the training split's
    per-feature range (tabular); random labels."""
    if ctx.image:
        x = ctx.info.from_pixels(unit)
    else:
        lo, hi = _feature_range(ctx.data)
        x = lo + unit * (hi - lo)
    return NonMembers(ctx.name, x.float().contiguous(), ctx.random_labels(), "random")


# ---------------------------------------------------------------------------------------------------------
# the transformed test images


class PermutedParams(Params):
    per_image: bool = Field(True, description="a fresh pixel permutation for every image (the paper's code); "
                                              "false: one permutation for all images")


@NONMEMBER_SETS.register("permuted", PermutedParams,
                         doc="test images with permuted pixel positions (tabular: permuted features)")
def permuted(ctx: SetContext, p: PermutedParams) -> NonMembers:
    """Test images whose pixel positions are permuted (all channels of a pixel move together)."""
    g = ctx.generator("perm")
    shape = ctx.info.input_shape
    c, size = (int(shape[0]), int(np.prod(shape[1:]))) if ctx.image else (1, int(np.prod(shape)))
    rows = ctx.n if p.per_image else 1
    perm = torch.argsort(torch.rand(rows, size, generator=g, dtype=torch.float64), dim=1)

    def transform(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], c, size)
        return flat.gather(2, perm.view(rows, 1, size).expand(x.shape[0], c, size)).reshape(x.shape)

    return _from_test(ctx, transform)


class ScaledParams(Params):
    factor: float = Field(255.0, gt=0, le=1e6, description="multiplier applied to the normalised inputs "
                                                           "(the paper: 255)")


@NONMEMBER_SETS.register("scaled", ScaledParams, doc="test inputs x 255 after normalisation")
def scaled(ctx: SetContext, p: ScaledParams) -> NonMembers:
    """Test inputs multiplied by `factor` after normalisation."""
    return _from_test(ctx, lambda x: x * p.factor)


@NONMEMBER_SETS.register("unnormalized", NoParams, doc="test images without their normalisation (raw pixels)")
def unnormalized(ctx: SetContext, p: NoParams) -> NonMembers:
    """Test images with the normalisation undone: pixels in [0, 1] fed as if normalised."""
    ctx.image_only()
    if ctx.info.pixel_stats(4) is None:
        raise SpecError(f"{ctx.data.name!r} has no normalisation (no mean/std), so 'unnormalized' would be the "
                        "test split itself", where=f"{ctx.where}.name")
    return _from_test(ctx, ctx.info.to_pixels)


# ---------------------------------------------------------------------------------------------------------
# noise


@NONMEMBER_SETS.register("uniform", NoParams, doc="uniform pixels in [0, 1], normalised; random labels")
def uniform(ctx: SetContext, p: NoParams) -> NonMembers:
    """Pixels U(0, 1), normalised (tabular: each feature uniform over the training split's range)."""
    return _generated(ctx, torch.rand((ctx.n, *ctx.info.input_shape), generator=ctx.generator("inputs")))


class GaussianParams(Params):
    sigma: float = Field(0.25, gt=0, le=10, description="standard deviation of the pixels around 0.5, before "
                                                        "clipping to [0, 1]")


@NONMEMBER_SETS.register("gaussian", GaussianParams,
                         doc="pixels N(0.5, sigma^2) clipped to [0, 1], normalised; random labels")
def gaussian(ctx: SetContext, p: GaussianParams) -> NonMembers:
    """Pixels N(0.5, sigma^2) clipped to [0, 1], normalised (tabular: mapped onto each feature's range)."""
    z = torch.randn((ctx.n, *ctx.info.input_shape), generator=ctx.generator("inputs"))
    return _generated(ctx, (0.5 + p.sigma * z).clamp(0, 1))


# ---------------------------------------------------------------------------------------------------------
# another data set


class DatasetParams(Params):
    name: str = Field(min_length=1, description="a registered data set (raymia list datasets), not the audited "
                                                "one")
    params: dict[str, Any] | None = Field(None, description="that data set's parameters (default: its defaults)")
    split: Literal["test", "train"] = Field("test", description="the split the images are drawn from (the "
                                                                "paper's code draws from the training splits)")


def _row_keys(x: torch.Tensor, info: DataInfo) -> set[bytes]:
    """Each image's pixels on a 1/4096 grid, as bytes (equal images -> equal keys, float rounding aside)."""
    q = torch.round(info.to_pixels(x.float()) * 4096).to(torch.int32).reshape(x.shape[0], -1)
    return {bytes(r) for r in q.numpy()}


@NONMEMBER_SETS.register("dataset", DatasetParams,
                         doc="another data set's images adapted to the input shape; random labels")
def other_dataset(ctx: SetContext, p: DatasetParams) -> NonMembers:
    """Another data set's images, adapted to the audited data's input shape and normalisation."""
    ctx.image_only()
    where = f"{ctx.where}.params"
    other = load_dataset(p.name, p.params, where=where)
    if other.info.kind != "image" or len(other.info.input_shape) != 3:
        raise SpecError(f"{p.name!r} holds {other.info.kind} inputs of shape {tuple(other.info.input_shape)}, "
                        "not images like the audited data", where=f"{where}.name")
    x_src = other.x_test if p.split == "test" else other.x_train
    idx = _pick(x_src.shape[0], ctx.n, derive_seed(ctx.seed, "ood", ctx.name, "pick"),
                f"the {p.split} split of {p.name!r}", ctx.where)
    x = adapt_inputs(x_src[torch.from_numpy(idx)], other.info, ctx.info, where=f"{where}.name")
    audited = _row_keys(ctx.data.x_train, ctx.info) | _row_keys(ctx.data.x_test, ctx.info)
    shared = sum(k in audited for k in _row_keys(x, ctx.info))
    if shared:
        raise SpecError(f"{shared} of the {ctx.n} images drawn from {p.name!r} are images of the audited data "
                        "set: name another data set (the audited one's test split is the in-distribution "
                        "baseline)", where=f"{where}.name")
    return NonMembers(ctx.name, x.float().contiguous(), ctx.random_labels(), "random", idx)


# ---------------------------------------------------------------------------------------------------------
# conditional GAN fakes

_ARCH_VERSION = 1  # bump when the nets or the training loop change (part of the cache key)
_BETAS = (0.0, 0.9)  # PLG-MI's (and SNGAN's) Adam betas for the hinge-loss cGAN


@dataclass(frozen=True)
class OodGanSettings:
    """What the cGAN is and how it trains (all but `checkpoint_every` are part of the cache key)."""

    latent_dim: int = 32
    width: int = 16
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    n_critic: int = 2
    checkpoint_every: int = 200
    # the cache key hashes the fields by name, n_critic under its name before the rename (n_dis): GANs cached
    # before it are found
    KEY_NAMES: ClassVar[dict[str, str]] = {"n_critic": "n_dis"}


_GAN = OodGanSettings()


class GanParams(Params):
    latent_dim: int = Field(_GAN.latent_dim, ge=1, le=4096, description="generator latent dimension")
    width: int = Field(_GAN.width, ge=1, le=1024, description="channels of the first (last) convolution of "
                                                              "the generator (discriminator)")
    steps: int = Field(_GAN.steps, ge=1, le=MAX_STEPS, description="generator updates (CPU-sized default; "
                                                                    "raise it on a GPU)")
    batch_size: int = Field(_GAN.batch_size, ge=1, le=65_536, description="images per batch; at most the "
                                                                         "number of public points")
    lr: float = Field(_GAN.lr, gt=0, le=1, description="Adam learning rate of both nets, betas (0, 0.9)")
    n_critic: int = Field(_GAN.n_critic, ge=1, le=100, validation_alias="n_dis",
                          description="discriminator updates per generator update")
    checkpoint_every: int = Field(_GAN.checkpoint_every, ge=1, le=10_000_000,
                                  description="training checkpoint period in steps (not in the cache key)")

    def settings(self) -> OodGanSettings:
        return OodGanSettings(**self.model_dump())


@dataclass
class FittedOodGan:
    """A trained pair (eval mode). `classes`: the classes present in the public split (sorted); `source`:
    'cache', 'trained' or 'resumed'; `start_step`: where this call's training started; `path`: the file."""

    generator: ConditionalGenerator
    discriminator: ProjectionDiscriminator
    classes: list[int]
    key: str
    path: Path
    source: str
    start_step: int


def ood_gan_key(x_public: torch.Tensor, y_public: torch.Tensor, info: DataInfo, settings: OodGanSettings,
                seed: int, device: torch.device) -> str:
    """The cache key: the public inputs' and labels' bytes, shape, normalisation and class count, every
    setting but `checkpoint_every`, the seed and the device type."""
    from raymia.cache import data_digest, key_digest

    public = SimpleNamespace(name="public", x_train=x_public, y_train=y_public)
    fields = {settings.KEY_NAMES.get(k, k): v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    return key_digest({"what": "ood-cgan", "arch": _ARCH_VERSION, "public": data_digest(public),
                       "shape": list(info.input_shape), "mean": info.mean, "std": info.std,
                       "num_classes": info.num_classes, "settings": fields, "seed": seed, "device": device.type})


def build_ood_gan(info: DataInfo, settings: OodGanSettings,
                  seed: int) -> tuple[ConditionalGenerator, ProjectionDiscriminator]:
    """The pair for all `info.num_classes` conditions, initialised from derive_seed(seed, "ood", "gan",
    "init") (the global RNG is left as it was)."""
    from raymia.inversion.plgmi import ConditionalGenerator, ProjectionDiscriminator
    from raymia.inversion.registry import image_shape

    shape = image_shape(info, "gan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "ood", "gan", "init"))
        return (ConditionalGenerator(shape, settings.latent_dim, settings.width, info.num_classes, info),
                ProjectionDiscriminator(shape, settings.width, info.num_classes))


def train_ood_gan(x_public: torch.Tensor, y_public: torch.Tensor, info: DataInfo, settings: OodGanSettings,
                  cache_dir: Path, device: torch.device, seed: int,
                  stop_after: int | None = None) -> FittedOodGan | None:
    """The cached cGAN for these public points and settings, else train it (resuming from a checkpoint).

    `stop_after`: return None after this many steps of this call, as if the process were killed then (no
    checkpoint is written beyond the periodic ones): for tests, or to spread training over several calls.
    """
    from raymia.cache import load_state
    from raymia.inversion.gan import _fresh, _load_pair, _resume, _save_pair
    from raymia.inversion.plgmi import hinge_cgan_steps

    x = x_public.detach().float().cpu()
    y_all = y_public.detach().long().cpu()
    if x.shape[0] != y_all.shape[0] or x.shape[0] < settings.batch_size:
        raise ValueError(f"{x.shape[0]} public inputs and {y_all.shape[0]} labels for batches of "
                         f"{settings.batch_size}")
    classes = sorted(int(c) for c in torch.unique(y_all))
    key = ood_gan_key(x, y_all, info, settings, seed, device)
    path = store_dir(cache_dir) / f"ood-cgan-{key}.pt"
    ckpt = path.with_name(f"ood-cgan-{key}.ckpt.pt")
    g_net, d_net = build_ood_gan(info, settings, seed)
    state = load_state(path, key)
    if state is not None and _load_pair(g_net, d_net, state, what="ood gan"):
        log.info("ood gan: cGAN loaded from %s", path)
        return FittedOodGan(g_net.to(device).eval(), d_net.to(device).eval(), classes, key, path, "cache",
                            settings.steps)

    def fresh(g, d):  # role "ood:gan:train" = derive_seed(seed, "ood", "gan", "train")
        return _fresh(g, d, settings, seed, device, betas=_BETAS, role="ood:gan:train")

    g_net, d_net, opt_g, opt_d, rng = fresh(g_net, d_net)
    start = _resume(ckpt, key, g_net, d_net, opt_g, opt_d, rng, what="ood gan")
    if start is None:  # a checkpoint that does not fit may have been loaded in part: start clean
        g_net, d_net, opt_g, opt_d, rng = fresh(*build_ood_gan(info, settings, seed))
        start = 0
    if start:
        log.info("ood gan: resuming cGAN training at step %d/%d from %s", start, settings.steps, ckpt)
    else:
        log.info("ood gan: training the cGAN on %d public points of %d classes (%d steps)", x.shape[0],
                 len(classes), settings.steps)
    n = x.shape[0]  # fake labels: those of random public points (the public split's class balance)
    if not hinge_cgan_steps(g_net, d_net, opt_g, opt_d, rng, x, y_all,
                            lambda b: y_all[torch.randint(n, (b,), generator=rng)], settings, info, start, device,
                            ckpt, key, "ood gan", stop_after):
        return None

    _save_pair(path, ckpt, key, g_net, d_net)
    return FittedOodGan(g_net.eval(), d_net.eval(), classes, key, path, "resumed" if start else "trained", start)


@NONMEMBER_SETS.register("gan", GanParams,
                         doc="class-conditional fakes of a cGAN trained on the public split; labels: the class")
def gan(ctx: SetContext, p: GanParams) -> NonMembers:
    """Fakes of a class-conditional GAN trained on the public split, classes cycling over the public
    split's classes; labels: the conditioning class."""
    ctx.image_only()
    m = ctx.public_index.size
    if m == 0:
        raise SpecError("the GAN trains on the public split (training points outside the audited population), "
                        "and the plan leaves none", where=f"{ctx.where}.name")
    if m < p.batch_size:
        raise SpecError(f"batch_size {p.batch_size} exceeds the {m} public points the GAN trains on",
                        where=f"{ctx.where}.params.batch_size")
    pub = torch.from_numpy(ctx.public_index)
    fitted = train_ood_gan(ctx.data.x_train[pub], ctx.data.y_train[pub], ctx.info, p.settings(), ctx.cache_dir,
                           ctx.device, ctx.seed)
    assert fitted is not None  # stop_after is not set
    cls = torch.tensor(fitted.classes, dtype=torch.int64)
    y = cls[torch.arange(ctx.n) % cls.shape[0]]
    z = torch.randn(ctx.n, p.latent_dim, generator=ctx.generator("z"))
    with torch.no_grad():
        x = torch.cat([fitted.generator(z[i:i + 1024].to(ctx.device), y[i:i + 1024].to(ctx.device)).float().cpu()
                       for i in range(0, ctx.n, 1024)])
    return NonMembers(ctx.name, x.contiguous(), y, "conditional")


# ---------------------------------------------------------------------------------------------------------
# the sets of a spec, as the bank queries them


@dataclass(frozen=True)
class OodInputs:
    """Every non-member set of a spec, concatenated in the spec's order: x [N, *input_shape] (normalised),
    y int64 [N]; `keys` name the sets (their labels), `sizes` their lengths, `label_sources` how each
    set's labels were obtained."""

    keys: tuple[str, ...]
    x: torch.Tensor
    y: torch.Tensor
    sizes: tuple[int, ...]
    label_sources: tuple[str, ...]

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for key, n in zip(self.keys, self.sizes, strict=True):
            out[key] = slice(start, start + n)
            start += n
        return out


def build_sets(sets: Sequence[Any], size: int, seed: int, data: Dataset, public_index: np.ndarray,
               cache_dir: Path, device: torch.device, fit: bool = True) -> OodInputs | None:
    """The spec's `ood.sets` (entries with name, params, key) built for `data`, `size` inputs each. With
    `fit=False` (`raymia check`) every set but `gan` is built (cheap, and their one-line refusals come
    before any training) and None is returned."""
    built = []
    for i, st in enumerate(sets):
        if not fit and st.name == "gan":
            continue
        built.append((st.key, build_nonmembers(st.name, st.params, data, public_index, size, seed, cache_dir,
                                               device, where=f"ood.sets.{i}")))
    if not fit:
        return None
    return OodInputs(keys=tuple(k for k, _ in built), x=torch.cat([b.x for _, b in built]).float(),
                     y=torch.cat([b.y for _, b in built]).long(), sizes=tuple(int(b.x.shape[0]) for _, b in built),
                     label_sources=tuple(b.label_source for _, b in built))
