"""KED-MI (raymia.inversion.kedmi): its losses by hand, a discriminator that learns the target's labels,
reconstructions of private digits that an independent evaluator recognises (because of the identity term),
a cache keyed by the target and an exact resume.

Setting as tests/test_inversion_plgmi.py: scikit-learn digits, private = classes 0-4 (the target's and the
evaluator's training data), public = classes 5-9 (inputs only). Target: raymia's `mlp`; evaluator: `cnn`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raymia.inversion.kedmi import (
    KEDMIParams,
    KGanSettings,
    discriminator_loss,
    generator_loss,
    kgan_key,
    prior_loss,
    train_kgan,
)
from raymia.inversion.registry import INVERSION, run_inversion
from tests.conftest import PRIVATE_CLASSES as PRIVATE
from tests.conftest import inversion_ctx as _ctx
from tests.conftest import top1 as _top1

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# A GAN small enough to train in a second on one core (gan_lr 1e-3, as PLG-MI's test).
TINY = {"latent_dim": 16, "width": 16, "gan_steps": 200, "n_critic": 2, "gan_lr": 1e-3, "steps": 300,
        "per_class": 8}


@pytest.fixture(scope="module")
def setting(inversion_setting):
    return inversion_setting


def test_losses_by_hand():
    lab = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # the target's logits: softmax (0.5, 0.5) and (0.12, 0.88)
    unl = torch.tensor([[1.0, 1.0]])
    fake = torch.tensor([[-1.0, 0.0]])
    p = F.softmax(soft, 1)
    ce = -(p * F.log_softmax(lab, 1)).sum(1).mean()
    lse_u, lse_f = math.log(2 * math.e), math.log(math.exp(-1) + 1)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = float(ce) + 0.5 * (softplus(lse_u) - lse_u + softplus(lse_f))
    assert discriminator_loss(lab, soft, unl, fake).item() == pytest.approx(expected, rel=1e-6)

    f_fake, f_real = torch.tensor([[1.0, 2.0], [3.0, 2.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])  # entropy ln 2 and ~0
    # batch means (2, 2) and (0, 0.5): mean |diff| = (2 + 1.5) / 2
    assert generator_loss(f_fake, f_real, logits, 0.5).item() == pytest.approx(1.75 + 0.5 * math.log(2), rel=1e-4)

    logits = torch.tensor([[0.3, -1.2, 2.0], [-50.0, -60.0, -55.0]])
    lse = torch.logsumexp(logits, 1)
    assert torch.allclose(prior_loss(logits), F.softplus(lse) - lse)  # the official form, written stably
    assert torch.isfinite(prior_loss(torch.full((1, 3), -1e4))).all()


def test_registry_lists_ked_mi(capsys):
    assert "ked_mi" in INVERSION.names()
    from raymia.cli import build_parser, cmd_list  # not main(): it would set up the raymia logger

    assert cmd_list(build_parser().parse_args(["list", "inversion"])) == 0
    out = capsys.readouterr().out
    for needle in ("inversion attack ked_mi", "identity_weight", "entropy_weight", "KED-MI: 100", "KED-MI: 0.02"):
        assert needle in out, needle


def test_ked_mi_reconstructs_private_classes_with_its_identity_term(setting, tmp_path, caplog):
    info, target, evaluator, x_public = setting
    ctx = _ctx(setting, tmp_path)
    target.train()  # the attack puts it in eval mode and gives it back as it was
    with caplog.at_level(logging.INFO, logger="raymia"):
        out = run_inversion("ked_mi", TINY, target, PRIVATE, ctx)
    assert target.training and all(p.requires_grad for p in target.parameters())
    target.eval()
    assert f"ked_mi: training the GAN on {len(x_public)} public inputs labelled by the target" in caplog.text
    assert out.images.shape == (40, 1, 8, 8) and out.labels.tolist() == [c for c in PRIVATE for _ in range(8)]
    pixels = out.images * info.std[0] + info.mean[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    top1 = _top1(evaluator, out.images, out.labels)
    assert top1 >= 0.6  # chance 0.2 (measured 0.93 and 0.85 for seeds 0 and 1)
    assert _top1(evaluator, out.images, (out.labels + 1) % len(PRIVATE)) <= 0.3  # the images, not the labels
    [cached] = list((tmp_path / "cache").glob("kedmi-gan-*.pt"))  # no checkpoint left behind

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raymia"):
        again = run_inversion("ked_mi", TINY, target, PRIVATE, ctx)
    assert "GAN loaded from" in caplog.text and torch.equal(again.images, out.images)  # cached, seeded
    # the prior alone (identity weight 0) samples the GAN's public-looking digits: near chance (0.23, 0.25)
    prior_only = run_inversion("ked_mi", {**TINY, "identity_weight": 0.0}, target, PRIVATE, ctx)
    assert _top1(evaluator, prior_only.images, prior_only.labels) <= 0.45
    assert list((tmp_path / "cache").iterdir()) == [cached]  # the attack's own settings share the GAN

    # knowledge-enriched: the discriminator's class head learnt the target's labels of the public inputs
    gan = train_kgan(target, x_public, info, KEDMIParams(**TINY).gan(), ctx.cache_dir, CPU, seed=0)
    with torch.no_grad():
        agree = (gan.discriminator(x_public)[1].argmax(1) == target(x_public).argmax(1)).float().mean()
    assert gan.source == "cache" and agree >= 0.7  # chance 0.2 (measured 0.91)


def test_kgan_key_covers_the_target(setting):
    info, target, _, x_public = setting
    settings = KGanSettings(latent_dim=8, width=8, steps=10)
    key = kgan_key(target, x_public, info, settings, 0, CPU)
    assert key == kgan_key(copy.deepcopy(target), x_public.clone(), info, replace(settings, checkpoint_every=1), 0, CPU)
    other = copy.deepcopy(target)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    x_other = x_public.clone()
    x_other[0, 0, 0, 0] += 1
    keys = {key, kgan_key(other, x_public, info, settings, 0, CPU), kgan_key(target, x_other, info, settings, 0, CPU),
            kgan_key(target, x_public, info, settings, 1, CPU),
            kgan_key(target, x_public, info, replace(settings, entropy_weight=0.0), 0, CPU)}
    assert len(keys) == 5


def test_gan_training_resumes_from_its_last_checkpoint(setting, tmp_path):
    info, target, _, x_public = setting
    settings = KGanSettings(latent_dim=8, width=8, steps=12, batch_size=16, n_critic=2, checkpoint_every=5)
    whole = train_kgan(target, x_public, info, settings, tmp_path / "a", CPU, seed=3)
    assert whole.source == "trained" and whole.start_step == 0
    cache = tmp_path / "b"
    assert train_kgan(target, x_public, info, settings, cache, CPU, seed=3, stop_after=7) is None
    assert [p.name for p in cache.iterdir()] == [f"kedmi-gan-{whole.key}.ckpt.pt"]  # written at step 5
    resumed = train_kgan(target, x_public, info, settings, cache, CPU, seed=3)
    assert resumed.source == "resumed" and resumed.start_step == 5
    a = {**whole.generator.state_dict(), **{f"d.{k}": v for k, v in whole.discriminator.state_dict().items()}}
    b = {**resumed.generator.state_dict(), **{f"d.{k}": v for k, v in resumed.discriminator.state_dict().items()}}
    assert any("running_mean" in k for k in a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_params_are_checked_in_one_line(setting, tmp_path):
    from raymia.errors import SpecError

    _, target, _, _ = setting
    for params, message in (({"identity_weight": -1}, "inversion.params: identity_weight: Input should be greater"),
                            ({"samples": 0}, "inversion.params: samples: Input should be greater than or equal to 1"),
                            ({"restarts": 2}, "inversion.params: restarts: unknown parameter of 'ked_mi'")):
        with pytest.raises(SpecError) as e:
            run_inversion("ked_mi", params, target, PRIVATE, _ctx(setting, tmp_path))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.gpu
def test_ked_mi_runs_on_cuda_and_leaves_the_target_where_it_was(setting, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    info, target, evaluator, _ = setting
    ctx = replace(_ctx(setting, tmp_path), device=torch.device("cuda"))
    out = run_inversion("ked_mi", {**TINY, "per_class": 4}, target, PRIVATE, ctx)
    assert out.images.device.type == "cpu" and next(target.parameters()).device.type == "cpu"
    assert out.images.shape == (20, 1, 8, 8) and _top1(evaluator, out.images, out.labels) >= 0.5
    again = run_inversion("ked_mi", {**TINY, "per_class": 4}, target, PRIVATE, ctx)  # from the cache
    assert len(list((tmp_path / "cache").glob("kedmi-gan-*.pt"))) == 1 and again.images.shape == out.images.shape
