"""VAE latent metric privacy and TL-DMI: noise scales, the shared VAE / pretrained-weights caches, freezing,
the public split, and one small bank per defense."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import raymia.defenses.tldmi as tldmi
import raymia.defenses.vae as vae
from raymia.data import load_dataset
from raymia.defenses import build_defense
from raymia.defenses.tldmi import TlDmi, layer_groups
from raymia.defenses.vae import VaeMetricPrivacy, metric_noise
from raymia.errors import DataError, SpecError
from raymia.spec import AuditSpec
from raymia.train.bank import BankContext, init_model, model_data, train_model, train_pack

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_VAE = {"latent_dim": 8, "hidden": 64, "vae_epochs": 8, "vae_batch_size": 64, "vae_lr": 3e-3,
             "vae_device": "cpu"}


@pytest.fixture(scope="module")
def tabular():
    return load_dataset("synthetic", {"num_train": 240, "num_test": 40, "num_features": 12, "num_classes": 4})


def _vae(data, cache: Path, seed: int = 0, **params) -> VaeMetricPrivacy:
    d = build_defense("vae_metric_privacy", {**SMALL_VAE, **params}, data.info)
    assert isinstance(d, VaeMetricPrivacy)
    d.setup(data, np.arange(100), cache, seed)
    return d


# --- the mechanisms --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "eps"), [(8, 0.5), (32, 10.0), (128, 100.0)])
def test_euclidean_noise_radius_and_direction(dim: int, eps: float) -> None:
    noise = metric_noise(20000, dim, eps, "euclidean", torch.Generator().manual_seed(1)).double()
    r = noise.norm(dim=1)
    assert abs(r.mean().item() / (dim / eps) - 1) < 0.05  # Gamma(dim, 1/eps) has mean dim / eps
    assert abs(r.var().item() / (dim / eps**2) - 1) < 0.1  # ... and variance dim / eps^2
    u = noise / r[:, None]
    assert u.mean(0).norm().item() < 0.03  # uniform directions: the mean unit vector is ~ 1/sqrt(n)
    assert abs((u**2).mean(0).sum().item() - 1) < 1e-9 and (u**2).mean(0).max().item() < 1.3 / dim


@pytest.mark.parametrize("eps", [0.3, 10.0])
def test_laplace_noise_scale(eps: float) -> None:
    noise = metric_noise(20000, 16, eps, "laplace", torch.Generator().manual_seed(2)).double()
    per_coord = noise.abs().mean(0) * eps  # E|Laplace(0, b)| = b = 1 / eps
    assert (per_coord - 1).abs().max().item() < 0.05
    assert noise.mean().abs().item() < 0.02 / eps


@pytest.mark.parametrize(("dim", "eps"), [(8, 0.5), (64, 3.0)])
def test_noise_matches_the_reference_distributions(dim: int, eps: float) -> None:
    """Feyisetan et al. 2020's d_X-privacy sampler (radius numpy gamma(shape=dim, scale=1/eps) times a
    normalised Gaussian direction) and i.i.d. Laplace(0, 1/eps): Kolmogorov-Smirnov against scipy's
    distributions, and against a sample of the reference sampler itself."""
    from scipy import stats

    noise = metric_noise(4000, dim, eps, "euclidean", torch.Generator().manual_seed(7)).double().numpy()
    r = np.linalg.norm(noise, axis=1)
    assert stats.kstest(r, "gamma", args=(dim, 0.0, 1.0 / eps)).pvalue > 0.01
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((4000, dim))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True) * rng.gamma(dim, 1.0 / eps, (4000, 1))
    assert stats.ks_2samp(r, np.linalg.norm(ref, axis=1)).pvalue > 0.01
    assert stats.ks_2samp(noise[:, 0], ref[:, 0]).pvalue > 0.01  # one coordinate: same marginal
    lap = metric_noise(4000, dim, eps, "laplace", torch.Generator().manual_seed(8)).double().numpy()
    assert stats.kstest(lap[:, 0], "laplace", args=(0.0, 1.0 / eps)).pvalue > 0.01


def test_noise_follows_the_generator() -> None:
    a = metric_noise(5, 4, 1.0, "euclidean", torch.Generator().manual_seed(3))
    b = metric_noise(5, 4, 1.0, "euclidean", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (5, 4)


# --- the VAE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("which", "params"), [
    ("digits", {}),
    ("digits", {"class_conditional": True, "encode": "sample", "mechanism": "laplace"}),
    ("tabular", {"vae_epochs": 20}),
    ("tabular", {"vae_epochs": 20, "class_conditional": True}),
])
def test_synthetic_records_keep_shape_and_labels(request, tmp_path, which: str, params: dict) -> None:
    data = request.getfixturevalue(which)
    d = _vae(data, tmp_path, **params)
    x, y = data.x_train[:50], data.y_train[:50]
    y_before = y.clone()
    x2, y2 = d.transform_train_data(x, y, torch.Generator().manual_seed(0))
    assert x2.shape == x.shape and x2.dtype == x.dtype and x2 is not x and torch.isfinite(x2).all()
    assert torch.equal(y2, y_before)
    assert not torch.equal(x2, x)
    # The fitted VAE reconstructs better than the per-feature mean does.
    rec = d.reconstruct(data.x_train, data.y_train, noise=False)
    base = (data.x_train - data.x_train.mean(0)).pow(2).mean()
    assert (rec - data.x_train).pow(2).mean() < base


@pytest.mark.parametrize("mechanism", ["euclidean", "laplace"])
def test_larger_eps_stays_closer_to_the_reconstruction(digits, tmp_path, mechanism: str) -> None:
    x, y = digits.x_train[:200], digits.y_train[:200]
    dist = []
    for eps in (0.1, 1.0, 10.0, 100.0):
        d = _vae(digits, tmp_path, epsilon=eps, mechanism=mechanism)
        clean = d.reconstruct(x, y, noise=False)
        noisy, _ = d.transform_train_data(x, y, torch.Generator().manual_seed(5))
        dist.append((noisy - clean).flatten(1).norm(dim=1).mean().item())
    assert all(a > b for a, b in zip(dist, dist[1:])), dist


def test_vae_is_fitted_once_and_cached(digits, tmp_path, monkeypatch) -> None:
    calls = []
    real = vae.train_vae

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(vae, "train_vae", counting)
    first = _vae(digits, tmp_path, epsilon=1.0)
    assert len(calls) == 1 and not first.loaded_from_cache and first.cache_path.is_file()
    assert list(tmp_path.glob("*.tmp")) == []

    def refuse(*a, **k):
        raise AssertionError("the VAE was fitted again")

    monkeypatch.setattr(vae, "train_vae", refuse)
    second = _vae(digits, tmp_path, epsilon=50.0, mechanism="laplace")  # epsilon / mechanism reuse the VAE
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    for (k, a), (_, b) in zip(first.vae.state_dict().items(), second.vae.state_dict().items()):
        assert torch.equal(a, b), k
    # A different seed or VAE setting is another cache entry.
    monkeypatch.setattr(vae, "train_vae", counting)
    other = _vae(digits, tmp_path, seed=1)
    assert other.cache_path != first.cache_path and len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper"])
def test_damaged_cache_is_refitted(digits, tmp_path, monkeypatch, damage: str) -> None:
    first = _vae(digits, tmp_path)
    path = first.cache_path
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:  # a readable file whose weights no longer match its checksum
        payload = torch.load(path, weights_only=True)
        name = next(iter(payload["state_dict"]))
        payload["state_dict"][name] = payload["state_dict"][name] + 1.0
        torch.save(payload, path)
    calls = []
    real = vae.train_vae
    monkeypatch.setattr(vae, "train_vae", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _vae(digits, tmp_path)
    assert calls == [1] and not again.loaded_from_cache
    for k, v in first.vae.state_dict().items():  # refitting is deterministic
        assert torch.equal(v, again.vae.state_dict()[k]), k
    assert vae.load_state(path, path.stem.removeprefix("vae-")) is not None  # rewritten whole


def test_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "vae-x.pt"
    real_save = torch.save

    def crash(obj, f, *a, **k):  # f: the open temporary file
        real_save(obj, f, *a, **k)
        f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        vae.save_state(path, "x", {"w": torch.ones(3)})
    assert not path.exists() and list(tmp_path.iterdir()) == []


# --- TL-DMI ----------------------------------------------------------------------------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("pretrained again instead of loading")


def _tl_spec(tmp_path: Path, population: int | None = 600, model: dict | None = None,
             train: dict | None = None, data: dict | None = None, **params) -> AuditSpec:
    return AuditSpec.model_validate({
        **({"data": data} if data else {}),
        "plan": {"num_models": 4, "population": population},
        "model": model or {"name": "mlp", "params": {"hidden": [64, 32]}},
        "train": {"epochs": 2, "batch_size": 32, **(train or {})},
        "defense": {"name": "tl_dmi", "params": {"pretrain_epochs": 3, "pretrain_device": "cpu", **params}},
        "bank": {"pack_size": 4},
        "queries": ["identity"],
        "output_dir": str(tmp_path / "runs"),
    })


def test_public_split_is_disjoint_from_the_population(tmp_path) -> None:
    ctx = BankContext.from_spec(_tl_spec(tmp_path))
    d = ctx.defense
    assert isinstance(d, TlDmi)
    pub, pop = d.public_index, ctx.plan.population
    assert np.intersect1d(pub, pop).size == 0
    assert pub.size + pop.size == ctx.data.x_train.shape[0] == 1347
    half = BankContext.from_spec(_tl_spec(tmp_path, public_fraction=0.5)).defense.public_index
    assert half.size == round(0.5 * pub.size) and np.isin(half, pub).all()


@pytest.mark.parametrize("population", [1347, None])
def test_no_public_data_is_an_error(tmp_path, population) -> None:
    with pytest.raises(SpecError, match="needs public data") as e:
        BankContext.from_spec(_tl_spec(tmp_path, population=population))
    assert e.value.where == "plan.population"


def test_weights_file_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "backbone.pt"
    with pytest.raises(DataError, match="nowhere/backbone.pt"):
        BankContext.from_spec(_tl_spec(tmp_path, weights=str(missing)))
    wrong = tmp_path / "wrong.pt"
    torch.save({"0.weight": torch.zeros(3, 3)}, wrong)
    ctx = BankContext.from_spec(_tl_spec(tmp_path, weights=str(wrong)))
    with pytest.raises(DataError, match="wrong.pt") as e:
        init_model(ctx, 0)
    assert "missing keys" in str(e.value)


def test_weights_file_is_used_instead_of_pretraining(tmp_path, monkeypatch) -> None:
    # With a weights file no public data is needed (the whole split may be audited).
    model = init_model(BankContext.from_spec(_tl_spec(tmp_path)), 3)
    path = tmp_path / "w.pt"
    torch.save({k: v + 0.5 for k, v in model.state_dict().items()}, path)
    monkeypatch.setattr(tldmi, "pretrain", _refuse)
    ctx = BankContext.from_spec(_tl_spec(tmp_path, population=1347, weights=str(path)))
    loaded = init_model(ctx, 0)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v + 0.5), k


def _check_frozen(ctx: BankContext, requested: float | None = None) -> dict[str, float]:
    d = ctx.defense
    assert isinstance(d, TlDmi)
    report: dict[str, float] = {}
    model = train_model(ctx, 1, CPU, report=report)
    pre = d.pretrained
    frozen = set(d.frozen_params)
    assert frozen
    for name, t in model.named_parameters():
        if name in frozen:
            assert not t.requires_grad and torch.equal(t.detach(), pre[name]), name
        else:
            assert t.requires_grad and not torch.equal(t.detach(), pre[name]), name
    # Norm statistics of frozen layers are kept too.
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[0] in set(d.frozen_modules) and buf.is_floating_point():
            assert torch.equal(buf, pre[name]), name
    counts = [sum(dict(model.named_parameters())[n].numel() for n in g[1]) for g in layer_groups(model)]
    total = sum(counts)
    expected = sum(t.numel() for n, t in model.named_parameters() if n in frozen) / total
    assert report["frozen_fraction"] == pytest.approx(expected)
    if requested is not None:
        assert abs(report["frozen_fraction"] - requested) <= max(counts) / total
    return report


def test_frozen_parameters_stay_bit_identical_mlp(tmp_path) -> None:
    # SGD with momentum and weight decay: frozen tensors must not move at all.
    sgd = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-2}
    ctx = BankContext.from_spec(_tl_spec(tmp_path, train=sgd, freeze_fraction=0.6))
    report = _check_frozen(ctx, requested=0.6)
    assert report["frozen_layers"] == 1.0  # 64x64 + 64 of 6570 parameters: 0.63
    assert report["frozen_fraction"] == pytest.approx(4160 / 6570)


def test_fine_tuning_lr_replaces_the_recipes(tmp_path) -> None:
    # the paper searches the fine-tuning lr: tl_dmi's lr trains exactly as the recipe's lr would
    def trained(train: dict, **params) -> dict[str, torch.Tensor]:
        ctx = BankContext.from_spec(_tl_spec(tmp_path, train={"optimizer": "sgd", **train}, **params))
        return train_model(ctx, 1, CPU, report={}).state_dict()

    recipe = trained({"lr": 0.03})
    given = trained({"lr": 0.5}, lr=0.03)
    other = trained({"lr": 0.5}, lr=0.01)
    assert all(torch.equal(recipe[k], given[k]) for k in recipe)
    assert not all(torch.equal(recipe[k], other[k]) for k in recipe)


def test_frozen_depth_cnn_with_batch_norm(tmp_path) -> None:
    cnn = {"name": "cnn", "params": {"channels": [8, 16], "hidden": 16, "batch_norm": True}}
    ctx = BankContext.from_spec(_tl_spec(tmp_path, model=cnn, freeze="depth", freeze_depth=2,
                                         train={"optimizer": "adamw", "weight_decay": 0.1}))
    report = _check_frozen(ctx)
    assert report["frozen_layers"] == 2.0
    assert set(ctx.defense.frozen_params) == {f"features.{i}.{j}" for i in (0, 1)
                                              for j in ("0.weight", "1.weight", "1.bias")}
    # refused where `raymia check` and the audit validate (the model's layers counted on the meta device),
    # not after pretraining: 2 convolutions (with their norms) and 2 linear layers
    too_deep = _tl_spec(tmp_path, model=cnn, freeze="depth", freeze_depth=4)
    with pytest.raises(SpecError) as e:
        BankContext.from_spec(too_deep, setup=False)
    assert str(e.value) == ("defense.params.freeze_depth: freeze_depth 4 leaves nothing to fine-tune: the model "
                            "has 4 parameterised layers; accepted: 0 to 3")


def test_freeze_depth_8_is_the_official_vgg16_bn_setting() -> None:
    """Ho et al.'s code (hosytuyen/TL-DMI, models/classify.py VGG16_TL with config freeze_layers 26) freezes
    the children 0..26 of torchvision's vgg16_bn().features, i.e. conv1_1..conv4_1 (8 of 13 convs) with
    their BatchNorms; BN1d + the classifier stay trainable. freeze: depth, freeze_depth: 8 freezes the same
    parameters (built on the meta device: no memory, no weights)."""
    torchvision = pytest.importorskip("torchvision")
    from raymia.defenses.tldmi import TlDmiParams, frozen_prefix

    class Vgg16Tl(torch.nn.Module):  # the official module layout: feature, bn (BatchNorm1d), fc_layer
        def __init__(self) -> None:
            super().__init__()
            self.feature = torchvision.models.vgg16_bn(weights=None).features
            self.bn = torch.nn.BatchNorm1d(512 * 2 * 2)
            self.fc_layer = torch.nn.Linear(512 * 2 * 2, 1000)

    with torch.device("meta"):
        model = Vgg16Tl()
    official = {f"feature.{i}.{n}" for i, child in enumerate(model.feature.children()) if i <= 26
                for n, _ in child.named_parameters()}
    k = frozen_prefix(model, TlDmiParams(freeze="depth", freeze_depth=8))
    ours = {n for g in layer_groups(model)[:k] for n in g[1]}
    assert k == 8 and ours == official and len(official) == 32  # 8 convs x (weight, bias) + 8 BNs x 2
    total = sum(t.numel() for t in model.parameters())
    assert sum(t.numel() for n, t in model.named_parameters() if n in ours) / total == pytest.approx(0.174, abs=1e-3)


def test_fresh_trainable_layers_and_pretraining_cache(tmp_path, monkeypatch) -> None:
    ctx = BankContext.from_spec(_tl_spec(tmp_path, init_trainable="fresh"))
    d = ctx.defense
    m0, m1 = init_model(ctx, 0), init_model(ctx, 1)
    assert not d.loaded_from_cache and d.cache_path.is_file()
    frozen = set(d.frozen_params)
    for name, t in m0.named_parameters():
        same = torch.equal(t, m1.state_dict()[name])
        assert same == (name in frozen), name  # frozen: pretrained; the rest: each model's own init
    monkeypatch.setattr(tldmi, "pretrain", _refuse)
    ctx2 = BankContext.from_spec(_tl_spec(tmp_path, freeze_fraction=0.1))  # freezing does not change the key
    init_model(ctx2, 0)
    assert ctx2.defense.loaded_from_cache and ctx2.defense.cache_path == d.cache_path
    for k, v in d.pretrained.items():
        assert torch.equal(v, ctx2.defense.pretrained[k]), k


def test_airbench_pretraining_starts_from_its_builder_whitened_on_public_data(tmp_path, monkeypatch) -> None:
    """airbench's whitening stem is a frozen buffer and its convolutions start as identities: the network
    TL-DMI pretrains is the builder's (dirac kept), whitened with the public split's patches (no member
    reaches the shared backbone), and the same whichever bank model is built first."""
    from raymia.models.convnets import WhiteningConv2d

    started: list[torch.nn.Module] = []
    real = tldmi.pretrain

    def spy(model, *args, **kwargs):
        started.append(copy.deepcopy(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tldmi, "pretrain", spy)
    image = {"name": "synthetic", "params": {"kind": "image", "image_size": 16, "num_train": 240, "num_test": 40}}

    def ctx_for(out: str) -> BankContext:
        return BankContext.from_spec(_tl_spec(
            tmp_path / out, population=160, model={"name": "airbench", "params": {"widths": [4, 6]}}, data=image,
            pretrain_epochs=1, freeze="depth", freeze_depth=1))

    ctx = ctx_for("a")
    m0 = init_model(ctx, 0)
    (base,) = started
    public = ctx.data.x_train[torch.from_numpy(ctx.defense.public_index)]
    members = ctx.data.x_train[model_data(ctx, 0).index]
    whitened = {}
    for name, x in (("public", public), ("members", members)):
        whitened[name] = WhiteningConv2d(x.shape[1])
        whitened[name].init_from_data(x)
    assert torch.allclose(base.stem.weight, whitened["public"].weight)
    assert not torch.allclose(base.stem.weight, whitened["members"].weight)
    first = base.group1[0].weight[:4]
    assert torch.equal(first, torch.nn.init.dirac_(torch.empty_like(first)))
    # The stem is in the frozen prefix: every bank model queries through the public whitening.
    assert "stem" in ctx.defense.frozen_modules
    assert torch.allclose(m0.stem.weight, whitened["public"].weight)
    other = ctx_for("b")
    init_model(other, 3)
    for k, v in ctx.defense.pretrained.items():
        assert torch.equal(v, other.defense.pretrained[k]), k


# --- one small bank per defense --------------------------------------------------------------------------
@pytest.mark.parametrize("defense", [
    {"name": "vae_metric_privacy", "params": {**SMALL_VAE, "epsilon": 5.0}},
    {"name": "tl_dmi", "params": {"pretrain_epochs": 3, "pretrain_device": "cpu", "freeze_fraction": 0.5}},
])
def test_small_bank_per_defense(tmp_path, defense: dict) -> None:
    spec = AuditSpec.model_validate({
        "plan": {"num_models": 4, "population": 600},
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "train": {"epochs": 2, "batch_size": 64},
        "defense": defense,
        "bank": {"pack_size": 4},
        "output_dir": str(tmp_path / "runs"),
    })
    ctx = BankContext.from_spec(spec)
    arrays, reports = train_pack(ctx, 0, CPU)
    assert arrays["logits"].shape == (4, 2, 600, 10) and np.isfinite(arrays["logits"]).all()
    assert arrays["test_logits"].shape[:2] == (4, 2) and np.isfinite(arrays["test_logits"]).all()
    assert any((tmp_path / "runs" / "cache").iterdir())
    if defense["name"] == "tl_dmi":
        fractions = [r["frozen_fraction"] for r in reports]
        assert len(fractions) == 4 and all(math.isclose(f, fractions[0]) for f in fractions)
