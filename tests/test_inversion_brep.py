"""BREP-MI (raymia.inversion.brep): label-only by construction (a target that returns only one-hot labels
gives the same reconstructions), the repulsion moves its starts to where an independent evaluator
recognises them, starts are in their class and distinct, GMI's cached GAN is shared, params are checked.

Setting (tests/conftest.py `inversion_setting`): digits, private classes 0-4, public classes 5-9.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymia.errors import SpecError
from raymia.inversion.brep import BrepParams, starts
from raymia.inversion.evaluation import score_reconstructions
from raymia.inversion.registry import INVERSION, run_inversion
from tests.conftest import PRIVATE_CLASSES as PRIVATE
from tests.conftest import inversion_ctx as _ctx

pytestmark = pytest.mark.usefixtures("one_thread")

GAN = {"latent_dim": 16, "width": 16, "gan_steps": 150, "gan_loss": "dcgan", "n_critic": 1}


class LabelsOnly(nn.Module):
    """The target as a label-only API: a one-hot vector of its predicted class."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.target(x)
        return F.one_hot(logits.argmax(1), logits.shape[1]).float()


def _private(digits):
    keep = digits.y_train < len(PRIVATE)
    return digits.x_train[keep], digits.y_train[keep]


def test_repulsion_moves_starts_to_where_the_evaluator_recognises_them(inversion_setting, tmp_path, digits, caplog):
    info, target, evaluator, _ = inversion_setting
    x, y = _private(digits)
    for seed in (0, 1):
        ctx = _ctx(inversion_setting, tmp_path, seed=seed)
        start = run_inversion("brep_mi", {**GAN, "per_class": 4, "max_steps": 1}, target, PRIVATE, ctx)
        out = run_inversion("brep_mi", {**GAN, "per_class": 4, "patience": 100}, target, PRIVATE, ctx)
        s0 = score_reconstructions(evaluator, start.images, start.labels, x, y)
        s1 = score_reconstructions(evaluator, out.images, out.labels, x, y)
        print(f"seed {seed}: starts top-1 {s0['top1']:.2f} knn {s0['knn_dist']:.3f}; "
              f"after repulsion top-1 {s1['top1']:.2f} knn {s1['knn_dist']:.3f}")
        # the target puts every start and every reconstruction in its class: the search never leaves it
        with torch.no_grad():
            assert (target(start.images).argmax(1) == start.labels).all()
            assert (target(out.images).argmax(1) == out.labels).all()
        # measured: top-1 0.65 -> 1.00 and 0.60 -> 0.90, squared KNN distance 19.90 -> 5.60 and 25.91 -> 12.58
        assert s1["top1"] >= s0["top1"] + 0.15 and s1["top1"] >= 0.8
        assert s1["knn_dist"] <= s0["knn_dist"] - 5.0
        assert out.images.shape == (20, *info.input_shape) and out.labels.tolist() == [c for c in PRIVATE for _ in range(4)]
    # GMI's GAN, from the cache that gmi also reads
    with caplog.at_level(logging.INFO, logger="raymia"):
        run_inversion("gmi", {**GAN, "steps": 5, "restarts": 1}, target, [0], _ctx(inversion_setting, tmp_path))
    assert "GAN loaded from" in caplog.text and "training the GAN" not in caplog.text


def test_only_the_predicted_labels_matter(inversion_setting, tmp_path):
    _, target, _, _ = inversion_setting
    ctx = _ctx(inversion_setting, tmp_path)
    params = {**GAN, "per_class": 2, "patience": 20}
    full = run_inversion("brep_mi", params, target, PRIVATE, ctx)
    labels = run_inversion("brep_mi", params, LabelsOnly(target), PRIVATE, ctx)
    assert torch.equal(full.images, labels.images)
    again = run_inversion("brep_mi", params, target, PRIVATE, ctx)
    assert torch.equal(full.images, again.images)  # seeded


def test_starts_are_in_their_class_and_distinct(caplog):
    torch.manual_seed(0)
    w = torch.randn(8, 3)

    def label(z):  # a linear labeller of the latents: class = argmax(z @ w)
        return (z @ w).argmax(1)

    p = BrepParams(latent_dim=8, per_class=3, init_batch=16)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    z = starts(label, y, p, torch.Generator().manual_seed(1))
    assert (label(z) == y).all() and z.abs().max() <= p.clip
    assert torch.unique(z, dim=0).shape[0] == len(y)
    # a class nobody reaches: random starts and one warning naming it
    with caplog.at_level(logging.WARNING, logger="raymia"):
        z = starts(label, torch.tensor([0, 5]), BrepParams(latent_dim=8, init_tries=3, init_batch=4),
                   torch.Generator().manual_seed(1))
    assert label(z)[0] == 0 and "labelled none of 12 generated images as class(es) [5]" in caplog.text


def test_params_are_checked_in_one_line(inversion_setting, tmp_path):
    _, target, _, _ = inversion_setting
    ctx = _ctx(inversion_setting, tmp_path)
    cases = [
        ({"threshold": 1.0}, "inversion.params: threshold: Input should be less than 1"),
        ({"expansion": 1.0}, "inversion.params: expansion: Input should be greater than 1"),
        ({"points": 0}, "inversion.params: points: Input should be greater than or equal to 1"),
        ({"gan_loss": "hinge"}, "inversion.params: gan_loss: accepted: 'wgan_gp' or 'dcgan'"),
        ({"identity_loss": "logit"}, "inversion.params: identity_loss: unknown parameter of 'brep_mi'; accepted: "
                                     "per_class, radius"),
    ]
    for params, message in cases:
        with pytest.raises(SpecError) as e:
            run_inversion("brep_mi", params, target, PRIVATE, ctx)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert "brep_mi" in INVERSION.names()


def test_compute_estimate(digits):
    from raymia.check import count_flops
    from raymia.inversion.registry import inversion_flops

    _, fwd = count_flops("mlp", {"hidden": [128]}, digits.info, 1)
    one, two = (inversion_flops("brep_mi", {**GAN, "max_steps": n}, digits.info, fwd, 5) for n in (100, 200))
    assert two > one and inversion_flops("brep_mi", {**GAN, "max_steps": 300}, digits.info, fwd, 5) - one == \
        pytest.approx(2 * (two - one))
    more_points = inversion_flops("brep_mi", {**GAN, "max_steps": 100, "points": 65}, digits.info, fwd, 5)
    assert more_points - one == pytest.approx((two - one) * (66 - 33) / 33)
    from raymia.inversion.registry import flops_at_most

    assert flops_at_most("brep_mi") and not flops_at_most("gmi")  # raymia check: "brep_mi at most ..."


@pytest.mark.gpu
def test_brep_mi_and_lomma_run_on_cuda_and_leave_the_target_where_it_was(inversion_setting, tmp_path, digits):
    from dataclasses import replace

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, target, evaluator, _ = inversion_setting
    x, y = _private(digits)
    ctx = replace(_ctx(inversion_setting, tmp_path), device=torch.device("cuda"))
    for name, params in (("brep_mi", {**GAN, "per_class": 4, "patience": 100}),
                         ("ked_mi", {"latent_dim": 16, "width": 16, "gan_steps": 150, "steps": 200, "per_class": 4,
                                     "identity_loss": "logit", "augment": ["cnn", "mlp"]})):
        out = run_inversion(name, params, target, PRIVATE, ctx)
        assert out.images.device.type == "cpu" and next(target.parameters()).device.type == "cpu"
        assert score_reconstructions(evaluator, out.images, out.labels, x, y)["top1"] >= 0.8, name
