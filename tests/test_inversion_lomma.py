"""LOMMA's identity loss in `gmi` and `ked_mi` (raymia.inversion.lomma): the logit loss with its feature
term and the students' mean by hand, the public feature mean, students distilled from the target and
cached, params and model shapes checked in one line, and on digits a reconstruction closer to the private
images than plain KED-MI's.

Setting (tests/conftest.py `inversion_setting`): digits, private classes 0-4 (the target's training data),
public classes 5-9 (the only inputs the attacks see).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymia.errors import SpecError
from raymia.inversion.evaluation import score_reconstructions
from raymia.inversion.lomma import IdentityLoss, IdentityParams, distil_student, identity_loss
from raymia.inversion.registry import INVERSION, InversionContext, run_inversion
from raymia.spec import ModelSpec
from tests.conftest import PRIVATE_CLASSES as PRIVATE
from tests.conftest import inversion_ctx as _ctx

pytestmark = pytest.mark.usefixtures("one_thread")

GAN = {"latent_dim": 16, "width": 16, "gan_steps": 150}
LOMMA = {"identity_loss": "logit", "augment": ["cnn", "mlp"]}


def _tiny_target() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5)).eval()


def test_identity_terms_by_hand():
    target = _tiny_target()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    p = torch.randn(8)
    h = torch.relu(target[1](x.flatten(1)))  # the target's penultimate features
    z_t, z_s = target[3](h), student(x)
    rows = torch.arange(6)

    logit = IdentityLoss([target, student], "logit", 0.5, p)(x, y)
    expect = -(z_t[rows, y] + z_s[rows, y]) / 2 + 0.5 * ((h - p) ** 2).mean(1)  # features: the target's only
    torch.testing.assert_close(logit, expect)
    alone = IdentityLoss([target], "logit", 0.0, None)(x, y)
    torch.testing.assert_close(alone, -z_t[rows, y])
    ce = IdentityLoss([target, student], "ce", 0.5, None)(x, y)
    torch.testing.assert_close(ce, (F.cross_entropy(z_t, y, reduction="none")
                                    + F.cross_entropy(z_s, y, reduction="none")) / 2)
    # the gradient reaches the images, through the features too
    logit.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expect.sum().backward()
    torch.testing.assert_close(grad, x.grad)


def test_feature_mean_is_the_targets_penultimate_mean_over_public_inputs(tmp_path, digits):
    target = _tiny_target()
    x_public = torch.randn(300, 1, 8, 8)
    ctx = InversionContext(info=digits.info, x_public=x_public, cache_dir=tmp_path)
    loss = identity_loss(target, IdentityParams(identity_loss="logit", feature_reg=2.0), ctx, x_public, "gmi")
    with torch.no_grad():
        torch.testing.assert_close(loss.feature_mean, torch.relu(target[1](x_public.flatten(1))).mean(0))
    assert loss.feature_reg == 2.0 and loss.models == [target]
    # cross-entropy, or no feature term: no mean is computed
    assert identity_loss(target, IdentityParams(), ctx, x_public, "gmi").feature_mean is None
    assert identity_loss(target, IdentityParams(identity_loss="logit", feature_reg=0), ctx, x_public,
                         "gmi").feature_mean is None


def test_students_learn_the_target_on_public_inputs_and_are_cached(inversion_setting, tmp_path, caplog):
    info, target, _, x_public = inversion_setting
    ctx = _ctx(inversion_setting, tmp_path)
    p = IdentityParams(augment=["cnn"])
    with caplog.at_level(logging.INFO, logger="raymia"):
        student = distil_student(target, x_public, info, ModelSpec(name="cnn"), 0, p, ctx, "gmi")
    assert f"gmi: distilling student 0 (cnn) from the target on {len(x_public)} public inputs" in caplog.text
    assert not student.training and not any(q.requires_grad for q in student.parameters())
    with torch.no_grad():
        agree = (student(x_public).argmax(1) == target(x_public).argmax(1)).float().mean().item()
        soft = F.softmax(target(x_public), 1)
        kl = F.kl_div(F.log_softmax(student(x_public), 1), soft, reduction="batchmean").item()
    print(f"student agrees with the target on {agree:.3f} of the public inputs; KL {kl:.4f}")
    assert agree >= 0.8  # 5 classes; the public digits are none of them, so this is the target's own quirks
    [cached] = list((tmp_path / "cache").glob("lomma-student-*.pt"))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raymia"):
        again = distil_student(target, x_public, info, ModelSpec(name="cnn"), 0, p, ctx, "gmi")
    assert "student 0 (cnn) loaded from" in caplog.text and "distilling" not in caplog.text
    for a, b in zip(student.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # another epoch count, another index or another target is another student
    distil_student(target, x_public, info, ModelSpec(name="cnn"), 0, IdentityParams(augment_epochs=2), ctx, "gmi")
    distil_student(target, x_public, info, ModelSpec(name="cnn"), 1, IdentityParams(augment_epochs=2), ctx, "gmi")
    first = next(target.parameters())
    with torch.no_grad():
        first.add_(1e-3)
    try:
        distil_student(target, x_public, info, ModelSpec(name="cnn"), 1, IdentityParams(augment_epochs=2), ctx, "gmi")
    finally:
        with torch.no_grad():
            first.sub_(1e-3)
    assert len(list((tmp_path / "cache").glob("lomma-student-*.pt"))) == 4 and cached.exists()


def test_params_and_shapes_are_checked_in_one_line(inversion_setting, tmp_path):
    from raymia.inversion.protocol import check_inversion_models
    from raymia.resolve import validate_spec
    from tests.test_inversion_protocol import GMI, spec_dict

    _, target, _, _ = inversion_setting
    ctx = _ctx(inversion_setting, tmp_path)
    cases = [
        ({"augment": ["resnet"]},
         "inversion.params: augment: 0.name: unknown model 'resnet' (did you mean 'resnet18'?); accepted: "),
        ({"augment": ["mlp", {"name": "cnn", "params": {"depth": 3}}]},
         "inversion.params: augment: 1.params: depth: unknown parameter of 'cnn'; accepted: channels"),
        ({"augment": [{"name": "cnn", "size": 3}]}, "inversion.params: augment.0.size: Extra inputs are not permitted"),
        ({"identity_loss": "nll"}, "inversion.params: identity_loss: accepted: 'ce' or 'logit'"),
        ({"feature_reg": -1}, "inversion.params: feature_reg: Input should be greater than or equal to 0"),
    ]
    for params, message in cases:
        for attack in ("gmi", "ked_mi"):
            with pytest.raises(SpecError) as e:
                run_inversion(attack, params, target, PRIVATE, ctx)
            assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    # a student that does not take the data's inputs is named before any training
    gmi = {**GMI, "params": {**GMI["params"], "augment": ["mlp", "lenet5"]}}
    spec = validate_spec(spec_dict(tmp_path, inversion={"attacks": [gmi]}))
    with pytest.raises(SpecError, match=r"^inversion\.attacks\.0\.params\.augment\.1: model 'lenet5' expects image "
                                        r"inputs of shape \(C, H, W\) with H, W >= 12"):
        check_inversion_models(spec, inversion_setting[0])


@pytest.mark.slow
def test_lomma_ked_mi_lands_closer_to_the_private_images(inversion_setting, tmp_path, digits):
    """LOMMA's claim, at digits scale: its reconstructions are nearer the private images of their class in
    the evaluator's feature space than plain KED-MI's, at equal recognisability (top-1 saturates here)."""
    info, target, evaluator, x_public = inversion_setting
    private = digits.y_train < len(PRIVATE)
    x, y = digits.x_train[private], digits.y_train[private]
    params = {**GAN, "steps": 200, "per_class": 4}
    ctx = _ctx(inversion_setting, tmp_path, seed=0)
    plain = score_reconstructions(evaluator, *_images(run_inversion("ked_mi", params, target, PRIVATE, ctx)), x, y)
    lomma = score_reconstructions(evaluator, *_images(run_inversion("ked_mi", {**params, **LOMMA}, target, PRIVATE,
                                                                     ctx)), x, y)
    # measured (squared KNN distance): 10.16 -> 5.61, top-1 0.95 -> 1.00 (seed 1, not run to keep the suite's
    # time: 12.46 -> 7.35, 0.90 -> 0.95)
    assert lomma["knn_dist"] <= plain["knn_dist"] - 2.0, (plain, lomma)
    assert lomma["top1"] >= plain["top1"] and lomma["top1"] >= 0.8, (plain, lomma)
    # GMI takes the same params and still recognises its classes
    out = run_inversion("gmi", {**GAN, "gan_loss": "dcgan", "n_critic": 1, "steps": 200, "restarts": 4,
                                "per_class": 4, **LOMMA}, target, PRIVATE, _ctx(inversion_setting, tmp_path))
    assert score_reconstructions(evaluator, out.images, out.labels, x, y)["top1"] >= 0.8  # measured 1.00


def _images(rec):
    return rec.images, rec.labels


def test_compute_estimate_counts_students(digits):
    from raymia.check import count_flops
    from raymia.inversion.registry import forward_flops, inversion_flops
    from raymia.models import build_model

    _, fwd = count_flops("mlp", {"hidden": [128]}, digits.info, 1)
    cnn = forward_flops(build_model("cnn", None, digits.info).eval(), torch.zeros(1, *digits.info.input_shape))
    base = {**GAN, "steps": 100, "restarts": 2, "per_class": 2}
    n_public = 500
    for attack, per_class_searches in (("gmi", 100 * 2 * 2), ("ked_mi", 100 * 1)):
        params = {k: v for k, v in base.items() if attack == "gmi" or k not in ("restarts", "per_class")}
        plain = inversion_flops(attack, params, digits.info, fwd, 5, n_public)
        logit = inversion_flops(attack, {**params, "identity_loss": "logit"}, digits.info, fwd, 5, n_public)
        aug = inversion_flops(attack, {**params, "augment": ["cnn"], "augment_epochs": 3}, digits.info, fwd, 5,
                              n_public)
        assert logit == plain  # the feature term rides on the target's forward pass
        distil = n_public * (fwd + 3 * 3 * cnn)
        search = per_class_searches * 5 * 3 * cnn
        assert aug - plain == pytest.approx(distil + search), attack


def test_registry_lists_the_params(capsys):
    from raymia.cli import build_parser, cmd_list

    assert cmd_list(build_parser().parse_args(["list", "inversion"])) == 0
    out = capsys.readouterr().out
    for needle in ("identity_loss", "'ce' | 'logit'", "feature_reg", "augment_epochs", "LOMMA"):
        assert needle in out, needle
    assert {"gmi", "ked_mi"} <= set(INVERSION.names())
