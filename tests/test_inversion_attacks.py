"""Model-inversion attacks (raymia.inversion): MIFace and GMI reconstruct private digits that an independent
evaluator recognises; GMI's GAN is cached and its training resumes exactly; params and names are checked.

Setting: scikit-learn digits, private = classes 0-4 (the target's and the evaluator's training data),
public = classes 5-9 (the only data the attacks see, and only their inputs). Target: raymia's `mlp`;
evaluator: raymia's `cnn` (another architecture, another seed), both trained here in a few seconds.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.inversion.gan import GanSettings, build_gan, gan_key, train_gan
from raymia.inversion.registry import INVERSION, run_inversion
from tests.conftest import PRIVATE_CLASSES as PRIVATE
from tests.conftest import inversion_ctx as _ctx
from tests.conftest import top1 as _top1

pytestmark = pytest.mark.usefixtures("one_thread")

# A GAN small enough to train in a few seconds on one core that still gives GMI a digit prior.
TINY_GMI = {"latent_dim": 16, "width": 16, "gan_steps": 150, "gan_loss": "dcgan", "n_critic": 1,
            "steps": 200, "restarts": 4, "per_class": 4}


@pytest.fixture(scope="module")
def setting(inversion_setting):
    return inversion_setting


def _in_pixel_range(images: torch.Tensor, info: DataInfo) -> bool:
    pixels = images * info.std[0] + info.mean[0]
    return bool(pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5)


def test_registry_lists_both_attacks(capsys):
    assert {"miface", "gmi"} <= set(INVERSION.names())
    from raymia.cli import build_parser, cmd_list  # not main(): it would set up the raymia logger

    assert cmd_list(build_parser().parse_args(["list", "inversion"])) == 0
    out = capsys.readouterr().out
    for needle in ("inversion attack miface", "inversion attack gmi", "restarts", "tv", "gan_steps",
                   "'wgan_gp' | 'dcgan'", "prior_weight", "0.01"):
        assert needle in out, needle
    assert "dataset digits" not in out


def test_params_and_inputs_are_checked_in_one_line(setting, tmp_path):
    info, target, _, _ = setting
    ctx = _ctx(setting, tmp_path)
    cases = [
        ("miface", {"steps": 0}, PRIVATE, "inversion.params: steps: Input should be greater than or equal to 1"),
        ("miface", {"bogus": 1}, PRIVATE, "inversion.params: bogus: unknown parameter of 'miface'; accepted: "),
        ("gmi", {"gan_loss": "hinge"}, PRIVATE, "inversion.params: gan_loss: accepted: 'wgan_gp' or 'dcgan'"),
        ("gmi", {"prior_weight": -1}, PRIVATE, "inversion.params: prior_weight: Input should be greater than"),
        ("miface", {}, [0, 5], "inversion.classes: need one or more classes in [0, 5); got [5]"),
        ("miface", {}, [], "inversion.classes: need one or more classes"),
        ("deepinversion", {}, PRIVATE, "inversion.name: unknown inversion attack 'deepinversion'; accepted: "),
    ]
    for name, params, classes, message in cases:
        with pytest.raises(SpecError) as e:
            run_inversion(name, params, target, classes, ctx)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    no_public = replace(ctx, x_public=torch.empty(0, *info.input_shape))
    with pytest.raises(SpecError, match=r"^public: inversion attack 'gmi' needs public data"):
        run_inversion("gmi", {}, target, [0], no_public)
    tabular = replace(ctx, info=DataInfo(num_classes=5, input_shape=(64,), kind="tabular"))
    with pytest.raises(SpecError, match=r"^data: inversion attack 'miface' reconstructs images"):
        run_inversion("miface", {}, target, [0], tabular)


def test_miface_reconstructs_private_classes(setting, tmp_path):
    info, target, evaluator, _ = setting
    target.train()  # the attack puts it in eval mode and gives it back as it was
    out = run_inversion("miface", {"per_class": 4}, target, PRIVATE, _ctx(setting, tmp_path))
    assert target.training and all(p.requires_grad for p in target.parameters())
    target.eval()
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == [c for c in PRIVATE for _ in range(4)]
    assert _in_pixel_range(out.images, info)
    top1 = _top1(evaluator, out.images, out.labels)
    print(f"miface: evaluator top-1 {top1:.2f}, target top-1 {_top1(target, out.images, out.labels):.2f}")
    assert top1 >= 0.6  # chance: 0.2 (measured 1.00)
    # the evaluator judges the images, not the labels: the same images named as another class fail
    assert _top1(evaluator, out.images, (out.labels + 1) % len(PRIVATE)) <= 0.3  # measured 0.00
    again = run_inversion("miface", {"per_class": 4}, target, PRIVATE, _ctx(setting, tmp_path))
    assert torch.equal(again.images, out.images)  # seeded


def test_gmi_reconstructs_private_classes_and_caches_its_gan(setting, tmp_path, caplog):
    info, target, evaluator, x_public = setting
    ctx = _ctx(setting, tmp_path)
    with caplog.at_level(logging.INFO, logger="raymia"):
        out = run_inversion("gmi", TINY_GMI, target, PRIVATE, ctx)
    assert f"gmi: training the GAN on {len(x_public)} public inputs (150 steps)" in caplog.text
    assert out.images.shape == (20, 1, 8, 8) and out.labels.tolist() == [c for c in PRIVATE for _ in range(4)]
    assert _in_pixel_range(out.images, info)
    top1 = _top1(evaluator, out.images, out.labels)
    print(f"gmi: evaluator top-1 {top1:.2f}, target top-1 {_top1(target, out.images, out.labels):.2f}")
    assert top1 >= 0.5  # chance: 0.2 (measured 1.00 for seeds 0, 1, 2)
    [cached] = list((tmp_path / "cache").glob("gmi-gan-*.pt"))  # no checkpoint left behind
    stamp = cached.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raymia"):
        again = run_inversion("gmi", TINY_GMI, target, PRIVATE, ctx)
    assert "GAN loaded from" in caplog.text and "training the GAN" not in caplog.text
    assert cached.stat().st_mtime_ns == stamp and torch.equal(again.images, out.images)
    # other GAN settings are another cache entry; the attack's own settings share the GAN
    run_inversion("gmi", {**TINY_GMI, "steps": 5, "prior_weight": 0.1}, target, [0], ctx)
    assert len(list((tmp_path / "cache").glob("gmi-gan-*.pt"))) == 1


RESUME = GanSettings(latent_dim=8, width=8, steps=12, batch_size=16, n_critic=2, checkpoint_every=5)


def _weights(gan) -> dict[str, torch.Tensor]:
    return {**{f"g.{k}": v for k, v in gan.generator.state_dict().items()},
            **{f"d.{k}": v for k, v in gan.discriminator.state_dict().items()}}


@pytest.mark.parametrize("loss", ["wgan_gp", "dcgan"])
def test_gan_training_resumes_from_its_last_checkpoint(setting, tmp_path, loss):
    info, _, _, x_public = setting
    settings, cpu = replace(RESUME, loss=loss), torch.device("cpu")
    whole = train_gan(x_public, info, settings, tmp_path / "a", cpu, seed=3)
    assert whole.source == "trained" and whole.start_step == 0

    cache = tmp_path / "b"
    assert train_gan(x_public, info, settings, cache, cpu, seed=3, stop_after=7) is None  # "killed" at step 7
    assert [p.name for p in cache.iterdir()] == [f"gmi-gan-{whole.key}.ckpt.pt"]  # written at step 5
    resumed = train_gan(x_public, info, settings, cache, cpu, seed=3)
    assert resumed.source == "resumed" and resumed.start_step == 5  # continued, not restarted
    assert [p.name for p in cache.iterdir()] == [f"gmi-gan-{whole.key}.pt"]
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gan_cache_and_checkpoint_live_in_a_store_named_by_uri(setting, tmp_path):
    """The same resume through a store named by a URI (fsspec's in-memory filesystem through pyarrow, the
    interface s3:// and gs:// share): the checkpoint and the final pair are files of that store only."""
    from raymia.storage import store_dir

    info, _, _, x_public = setting
    cpu = torch.device("cpu")
    whole = train_gan(x_public, info, RESUME, tmp_path / "a", cpu, seed=3)
    cache = store_dir(f"memory://raymia-gan-{tmp_path.name}", "cache")
    assert train_gan(x_public, info, RESUME, cache, cpu, seed=3, stop_after=7) is None
    ckpt = cache / f"gmi-gan-{whole.key}.ckpt.pt"
    assert ckpt.exists() and str(ckpt).startswith("memory://")
    resumed = train_gan(x_public, info, RESUME, cache, cpu, seed=3)
    assert resumed.source == "resumed" and resumed.start_step == 5 and not ckpt.exists()
    assert train_gan(x_public, info, RESUME, cache, cpu, seed=3).source == "cache"
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("**/gmi-gan-*.ckpt.pt"))  # nothing went to the local disk


def test_damaged_gan_files_are_refitted(setting, tmp_path, caplog):
    info, _, _, x_public = setting
    cpu, cache = torch.device("cpu"), tmp_path / "cache"
    first = train_gan(x_public, info, RESUME, cache, cpu, seed=0)
    first.path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="raymia"):
        again = train_gan(x_public, info, RESUME, cache, cpu, seed=0)
    assert again.source == "trained" and "unreadable" in caplog.text
    assert all(torch.equal(v, _weights(again)[k]) for k, v in _weights(first).items())
    assert train_gan(x_public, info, RESUME, cache, cpu, seed=0).source == "cache"
    # a damaged checkpoint: training starts over
    assert train_gan(x_public, info, RESUME, tmp_path / "c", cpu, seed=0, stop_after=6) is None
    [ckpt] = (tmp_path / "c").iterdir()
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert train_gan(x_public, info, RESUME, tmp_path / "c", cpu, seed=0).source == "trained"
    # the key: the public inputs' bytes, the settings but the checkpoint period, the seed
    key = gan_key(x_public, info, RESUME, 0, cpu)
    assert key == first.key == gan_key(x_public.clone(), info, replace(RESUME, checkpoint_every=1), 0, cpu)
    x_other = x_public.clone()
    x_other[0, 0, 0, 0] += 1
    assert len({key, gan_key(x_other, info, RESUME, 0, cpu), gan_key(x_public, info, RESUME, 1, cpu),
                gan_key(x_public, info, replace(RESUME, lr=1e-3), 0, cpu)}) == 4


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 30, 30), (1, 5, 7)])
def test_gan_sizes_follow_the_input_shape(shape):
    info = DataInfo(num_classes=10, input_shape=shape, kind="image", mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    g_net, d_net = build_gan(info, GanSettings(latent_dim=8, width=4), seed=0)
    x = g_net.eval()(torch.randn(3, 8))
    assert x.shape == (3, *shape) and d_net(x).shape == (3,)
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-5 and x.max() <= (1 - 0.5) / 0.25 + 1e-5


@pytest.mark.gpu
def test_attacks_run_on_cuda_and_leave_the_target_where_it_was(setting, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    info, target, evaluator, _ = setting
    ctx = replace(_ctx(setting, tmp_path), device=torch.device("cuda"))
    for name, params in (("miface", {"per_class": 2}), ("gmi", {**TINY_GMI, "per_class": 2})):
        out = run_inversion(name, params, target, PRIVATE, ctx)
        assert out.images.device.type == "cpu" and next(target.parameters()).device.type == "cpu"
        assert out.images.shape == (10, 1, 8, 8) and _in_pixel_range(out.images, info)
        assert _top1(evaluator, out.images, out.labels) >= 0.5
