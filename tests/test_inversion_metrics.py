"""Model-inversion scoring (raymia.inversion.evaluation) on hand-made cases and scikit-learn's digits: the
Frechet distance's known answers, FID/KNN/top-k on hand-built evaluators (a Linear layer whose features are
its inputs), a real evaluation classifier, its cache and the image grid."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from raymia.inversion.evaluation import (
    cached_evaluator,
    default_arch,
    feature_layer,
    features,
    frechet_distance,
    save_grid,
    score_reconstructions,
    train_evaluator,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_evaluator(weight: torch.Tensor) -> nn.Module:
    """Logits = x @ weight.T over the flattened input; its features (the last Linear's input) are the
    flattened input itself."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return nn.Sequential(nn.Flatten(), lin)


@pytest.fixture(scope="module")
def evaluator(digits):
    return train_evaluator(digits.x_train, digits.y_train, 10, digits.info.input_shape, epochs=10, seed=0)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_raymia():
    """raymia's warnings, whatever propagation the CLI set on its logger."""
    handler, logger = Collect(), logging.getLogger("raymia")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    cov = a.T @ a / 6 + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # Equal covariances: the squared distance of the means.
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-8)
    assert frechet_distance(mu1, cov, mu1, cov) < 1e-6
    # 1-D with standard deviations s1, s2 (variances passed): (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(1.0, 2.0**2, -0.5, 0.5**2) == pytest.approx(1.5**2 + 1.5**2, rel=1e-10)
    assert frechet_distance([3.0], [[4.0]], [3.0], [[4.0]]) < 1e-6
    # Singular covariances: 0 for identical, |dmu|^2 for shifted.
    sing = np.outer([1.0, 2.0, 0.0], [1.0, 2.0, 0.0])
    assert frechet_distance(np.zeros(3), sing, np.zeros(3), sing) < 1e-6
    assert frechet_distance(np.zeros(3), sing, np.ones(3), sing) == pytest.approx(3.0, abs=1e-4)
    # Different covariances count: N(0, I) vs N(0, 4I) in 2-D: tr(I) + tr(4I) - 2 tr(2I) = 2.
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), 4 * np.eye(2)) == pytest.approx(2.0, rel=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_distance_of_a_singular_covariance_is_exact():
    """One covariance lacks a direction the other has (fewer points than features): the closed form, with
    no eps * I bias (adding 1e-6 I to both gave 0.998 for 1 and 8.2e-5 for 1e-4, as eps is not small
    against a variance of 1e-4), and the distance scales with the variances."""
    for lam in (1.0, 1e-4):
        # diag(lam, 0) vs lam I: (sqrt(lam) - sqrt(lam))^2 + (0 - sqrt(lam))^2 = lam.
        assert frechet_distance(np.zeros(2), np.diag([lam, 0.0]), np.zeros(2), lam * np.eye(2)) == pytest.approx(
            lam, rel=1e-9)
    # Rank one v v^T, v = (1, 2, 0), against diag(1, 4, 9) (not commuting): sigma1 sigma2 has the one nonzero
    # eigenvalue v^T sigma2 v = 17, so FD = |dmu|^2 + |v|^2 + 14 - 2 sqrt(17) = 3 + 5 + 14 - 2 sqrt(17).
    v = np.array([1.0, 2.0, 0.0])
    value = frechet_distance(np.zeros(3), np.outer(v, v), np.ones(3), np.diag([1.0, 4.0, 9.0]))
    assert value == pytest.approx(22.0 - 2.0 * math.sqrt(17.0), rel=1e-9)
    assert frechet_distance(np.ones(3), np.diag([1.0, 4.0, 9.0]), np.zeros(3), np.outer(v, v)) == pytest.approx(
        value, rel=1e-9)


def test_fid_of_identity_features_is_the_squared_shift():
    """Features = the 4 pixels of 2x2 images: a set shifted by c per pixel has FID 4 c^2 exactly (same
    covariance), identical sets 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 2, 2, generator=g)
    y = torch.randint(0, 2, (300,), generator=g)
    ev = linear_evaluator(torch.randn(2, 4, generator=g))
    assert score_reconstructions(ev, x.clone(), y, x, y)["fid"] < 1e-6
    fids = [score_reconstructions(ev, x + c, y, x, y)["fid"] for c in (0.1, 0.5, 2.0)]
    assert fids == pytest.approx([4 * 0.1**2, 4 * 0.5**2, 4 * 2.0**2], rel=1e-6)


def test_fid_in_a_trained_evaluators_feature_space(digits, evaluator):
    cls = digits.y_train < 3
    xs, ys = digits.x_train[cls], digits.y_train[cls]
    same = score_reconstructions(evaluator, xs.clone(), ys, digits.x_train, digits.y_train)
    assert same["fid"] < 1e-6 and same["knn_dist"] < 1e-5
    assert same["n"] == same["n_private"] == int(cls.sum()) and same["feature_dim"] == 128
    fids = [score_reconstructions(evaluator, xs + c, ys, digits.x_train, digits.y_train)["fid"]
            for c in (0.25, 0.5, 1.0)]
    assert 0 < fids[0] < fids[1] < fids[2]


# ---------------------------------------------------------------------------------------------- KNN distance
def test_knn_distance_by_hand():
    """2-D identity features: each reconstruction's squared distance to the nearest private point OF ITS
    CLASS, averaged (the official codes' `min_d * min_d` summed and divided by N)."""
    ev = linear_evaluator(torch.eye(2))
    px = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    py = torch.tensor([0, 0, 1])
    recon = torch.tensor([[0.0, 1.0], [3.0, 4.0], [10.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 0, 1, 1])  # distances 1, 0, 0 and 10 (class 1 has only [10, 0])
    r = score_reconstructions(ev, recon, target, px, py)
    assert r["knn_dist"] == pytest.approx((1 + 0 + 0 + 100) / 4, abs=1e-12)
    # Squared, not plain: distances [1, 1] are closer than [0, 1.9] (1.0 < 1.805; plain 1.0 > 0.95).
    near = score_reconstructions(ev, torch.tensor([[0.0, 1.0], [3.0, 5.0]]), py[:2], px, py)["knn_dist"]
    mixed = score_reconstructions(ev, torch.tensor([[0.0, 0.0], [3.0, 5.9]]), py[:2], px, py)["knn_dist"]
    assert near == pytest.approx(1.0) and mixed == pytest.approx(1.805) and near < mixed
    assert score_reconstructions(ev, px[:2], py[:2], px, py)["knn_dist"] == 0.0


def test_knn_distance_zero_for_a_private_image_and_positive_otherwise(digits, evaluator):
    first = [int(torch.nonzero(digits.y_train == c)[0]) for c in range(10)]
    copy = score_reconstructions(evaluator, digits.x_train[first], digits.y_train[first],
                                 digits.x_train, digits.y_train)
    assert copy["knn_dist"] < 1e-5 and copy["top1"] == 1.0
    # Held-out images of the same classes are not private images: a positive distance.
    held = [int(torch.nonzero(digits.y_test == c)[0]) for c in range(10)]
    other = score_reconstructions(evaluator, digits.x_test[held], digits.y_test[held],
                                  digits.x_train, digits.y_train)
    assert other["knn_dist"] > 0.1
    assert math.isnan(score_reconstructions(evaluator, digits.x_train[:1], digits.y_train[:1],
                                            digits.x_train, digits.y_train)["fid"])


# ------------------------------------------------------------------------------------------------ top-1 / top-k
def test_top1_and_top5_by_hand():
    """Logits = the input (identity weights over 6 classes): the target's rank is set by hand."""
    ev = linear_evaluator(torch.eye(6))
    logits = torch.tensor([
        [6.0, 5, 4, 3, 2, 1],  # class 0 ranks 1st
        [5.0, 6, 4, 3, 2, 1],  # class 0 ranks 2nd
        [2.0, 6, 5, 4, 3, 1],  # class 0 ranks 5th
        [1.0, 6, 5, 4, 3, 2],  # class 0 ranks 6th
    ])
    target = torch.zeros(4, dtype=torch.int64)
    px, py = torch.eye(6), torch.arange(6)
    r = score_reconstructions(ev, logits, target, px, py)
    assert (r["top1"], r["top5"], r["n"]) == (0.25, 0.75, 4)
    assert score_reconstructions(ev, logits, target, px, py, k=3)["top3"] == 0.5
    # Three classes (five: the digits' private split): every class is in the top 5, so top-5 would be 1
    # whatever the reconstructions; it is undefined (nan), which the reports print as n/a
    ev3 = linear_evaluator(torch.eye(3))
    r3 = score_reconstructions(ev3, torch.tensor([[0.0, 2, 1], [1.0, 0, 2]]), torch.tensor([0, 1]),
                               torch.eye(3), torch.arange(3))
    assert r3["top1"] == 0.0 and math.isnan(r3["top5"])
    assert math.isnan(score_reconstructions(ev, logits, target, px, py, k=6)["top6"])


def test_score_inputs_are_validated():
    ev = linear_evaluator(torch.eye(3))
    px, py = torch.eye(3), torch.arange(3)
    with pytest.raises(ValueError, match="one label per reconstruction"):
        score_reconstructions(ev, px, torch.tensor([0, 1]), px, py)
    with pytest.raises(ValueError, match="one label per private image"):
        score_reconstructions(ev, px, py, px, py[:2])
    with pytest.raises(ValueError, match="differ in shape"):
        score_reconstructions(ev, px, py, torch.zeros(3, 4), py)
    with pytest.raises(ValueError, match="evaluator's classes"):
        score_reconstructions(ev, px, torch.tensor([0, 1, 3]), px, py)
    with pytest.raises(ValueError, match=r"classes \[2\] have no private images"):
        score_reconstructions(ev, px, py, px[:2], py[:2])
    with pytest.raises(ValueError, match="no nn.Linear"):
        features(nn.Flatten(), px)


# ------------------------------------------------------------------------------------ the evaluation classifier
def test_evaluator_learns_digits_and_its_features_are_the_penultimate_layer(digits, evaluator):
    assert not evaluator.training and default_arch(digits.info.input_shape) == "cnn"
    with torch.no_grad():
        acc = (evaluator(digits.x_test).argmax(1) == digits.y_test).double().mean().item()
        hidden = evaluator.classifier[:2](evaluator.pool(evaluator.features(digits.x_test[:50])))
    assert acc > 0.9
    f = features(evaluator, digits.x_test[:50], batch=16)
    assert f.shape == (50, 128) and torch.allclose(f, hidden, atol=1e-5)
    assert feature_layer(evaluator) == "input of classifier.2 (Linear 128->10)"


def test_training_is_seeded_and_leaves_the_callers_rng_alone(digits):
    x, y = digits.x_train[:200].flatten(1), digits.y_train[:200]
    before = torch.get_rng_state()
    a = train_evaluator(x, y, 10, (64,), epochs=2, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = train_evaluator(x, y, 10, (64,), epochs=2, seed=3)
    c = train_evaluator(x, y, 10, (64,), epochs=2, seed=4)
    assert default_arch((64,)) == "mlp" and isinstance(a[-1], nn.Linear)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a[-1].weight, c[-1].weight)
    with pytest.raises(ValueError, match="labels outside"):
        train_evaluator(x, y + 5, 10, (64,), epochs=1)


def test_cache_reuses_the_weights_and_refits_a_damaged_file(digits, tmp_path, warnings_of_raymia):
    x, y = digits.x_train[:300], digits.y_train[:300]
    kw = dict(epochs=2, seed=0, batch_size=64)
    first = cached_evaluator(tmp_path, {"data": "digits"}, x, y, 10, (1, 8, 8), **kw)
    assert not first.from_cache and first.path.is_file() and first.path.parent == tmp_path
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    again = cached_evaluator(tmp_path, {"data": "digits"}, x, y, 10, (1, 8, 8), **kw)
    assert again.from_cache and again.path == first.path and not again.model.training
    ref = first.model.state_dict()
    assert all(torch.equal(ref[k], again.model.state_dict()[k]) for k in ref)
    # Another setting, other data or other key parts: another file.
    assert cached_evaluator(tmp_path, {"data": "other"}, x, y, 10, (1, 8, 8), **kw).path != first.path
    assert cached_evaluator(tmp_path, {"data": "digits"}, x[:299], y[:299], 10, (1, 8, 8), **kw).path != first.path
    # A damaged file: a warning, then retrained (seeded: the same weights) and rewritten.
    first.path.write_bytes(b"not a torch file")
    assert warnings_of_raymia == []
    fixed = cached_evaluator(tmp_path, {"data": "digits"}, x, y, 10, (1, 8, 8), **kw)
    assert not fixed.from_cache and any("refitting" in m for m in warnings_of_raymia)
    assert all(torch.equal(ref[k], fixed.model.state_dict()[k]) for k in ref)
    assert cached_evaluator(tmp_path, {"data": "digits"}, x, y, 10, (1, 8, 8), **kw).from_cache


# ------------------------------------------------------------------------------------------------- image grid
def test_save_grid_writes_a_png_of_the_grids_shape(digits, tmp_path):
    import matplotlib.image as mpimg

    images = digits.x_train[:10].clone()
    images[0] = (0.0 - digits.info.mean[0]) / digits.info.std[0]  # black once normalisation is undone
    images[1] = (1.0 - digits.info.mean[0]) / digits.info.std[0]  # white
    mean, std = digits.info.mean, digits.info.std
    path = save_grid(images, tmp_path / "grids" / "recon.png", nrow=5, mean=mean, std=std)
    png = mpimg.imread(path)
    # 2 rows of 5 images of 8x8 enlarged 8 times, 2 px of padding: 5 x 66 + 2 by 2 x 66 + 2.
    assert path.suffix == ".png" and png.shape[:2] == (134, 332)
    assert png.shape[1] / png.shape[0] == pytest.approx(5 / 2, rel=0.02)
    assert png[2 + 32, 2 + 32, :3].max() < 0.05 and png[2 + 32, 2 + 66 + 32, :3].min() > 0.95
    labelled = mpimg.imread(save_grid(images, tmp_path / "labelled.png", nrow=5, mean=mean, std=std,
                                      labels=[f"class {int(c)}" for c in digits.y_train[:10]]))
    assert labelled.shape[1] == 332 and labelled.shape[0] == 134 + 2 * 16
    unit = mpimg.imread(save_grid(torch.rand(3, 3, 16, 8), tmp_path / "rgb.png", nrow=4, scale=2))
    assert unit.shape[:2] == (16 * 2 + 4, 3 * (8 * 2 + 2) + 2)
    with pytest.raises(ValueError, match="expected images"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
