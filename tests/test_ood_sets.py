"""The non-member sets of raymia.data.ood (Hintersdorf et al. 2022's out-of-distribution and GAN-generated
inputs): shapes, values in pixel space, labels, determinism, the GAN's cache and exact resume, another data
set adapted to digits' 1x8x8, tabular data, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymia.data import Dataset, load_dataset
from raymia.data.ood import (
    NONMEMBER_SETS,
    OodGanSettings,
    build_nonmembers,
    pick_test_images,
    train_ood_gan,
)
from raymia.datainfo import DataInfo
from raymia.errors import SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
N = 200
TINY_GAN = {"latent_dim": 8, "width": 8, "steps": 12, "batch_size": 32, "n_critic": 1, "checkpoint_every": 5}


@pytest.fixture(scope="module")
def public(digits):
    return np.arange(600, digits.x_train.shape[0])  # any training points the audit leaves out


def build(digits, public, name, params=None, n=N, seed=0, cache=None, where="ood"):
    return build_nonmembers(name, params, digits, public, n, seed, cache or "unused-cache", CPU, where=where)


def px(x, info):
    """Pixels of normalised one-channel images, by hand."""
    assert len(info.mean) == 1
    return x * info.std[0] + info.mean[0]


def test_registry_lists_the_sets_with_documented_bounded_params():
    assert NONMEMBER_SETS.names() == ["dataset", "gan", "gaussian", "permuted", "scaled", "uniform",
                                      "unnormalized"]
    for entry in NONMEMBER_SETS.entries():
        assert entry.doc
        for fname, f in entry.params.model_fields.items():
            assert f.description, (entry.name, fname)


def test_test_split_sets_transform_the_same_source_images(digits, public):
    idx = pick_test_images(digits, N, 0)
    assert len(set(idx.tolist())) == N and idx.max() < digits.x_test.shape[0]
    src_x, src_y = digits.x_test[torch.from_numpy(idx)], digits.y_test[torch.from_numpy(idx)]
    info = digits.info
    for name in ("permuted", "scaled", "unnormalized"):
        out = build(digits, public, name)
        assert out.x.shape == (N, 1, 8, 8) and out.x.dtype == torch.float32 and out.y.dtype == torch.int64
        assert out.label_source == "source" and np.array_equal(out.source_index, idx)
        assert torch.equal(out.y, src_y)  # the labels are the source images' labels

    perm = build(digits, public, "permuted")
    p, s = px(perm.x, info).flatten(1), px(src_x, info).flatten(1)
    assert torch.equal(p.sort(1).values, s.sort(1).values)  # each image's multiset of pixels
    assert (p - s).abs().amax(1).gt(1e-3).float().mean() > 0.95  # and almost every image is changed

    sc = build(digits, public, "scaled")
    assert torch.equal(sc.x, 255 * src_x)  # x255 after normalisation
    assert torch.allclose(px(sc.x, info), 255 * src_x * info.std[0] + info.mean[0])
    assert build(digits, public, "scaled", {"factor": 2.0}).x.equal(2 * src_x)

    un = build(digits, public, "unnormalized")
    assert torch.allclose(un.x, px(src_x, info), atol=1e-6)  # raw pixels fed as if normalised
    assert un.x.min() >= -1e-6 and un.x.max() <= 1 + 1e-6
    grid = un.x * 16  # digits' pixels are k/16
    assert torch.allclose(grid, grid.round(), atol=1e-4)


def test_pixel_permutation_per_image_or_shared_moves_channels_together():
    """Images whose values code (image, channel, position): the permutation is read back exactly."""
    n, c, side = 30, 3, 4
    pos = torch.arange(side * side, dtype=torch.float32)
    x = (torch.arange(n).view(n, 1, 1) * 100 + pos.view(1, 1, -1) + torch.arange(c).view(1, c, 1) * 0.25)
    x = x.view(n, c, side, side)
    info = DataInfo(num_classes=10, input_shape=(c, side, side), kind="image", mean=(0.5,) * c, std=(0.25,) * c)
    data = Dataset("codes", x, torch.arange(n) % 10, x.clone(), torch.arange(n) % 10, info)
    for per_image in (True, False):
        out = build(data, np.arange(0), "permuted", {"per_image": per_image}, n=n)
        i = torch.from_numpy(out.source_index).view(n, 1, 1)
        perm = out.x.view(n, c, -1) - i * 100 - torch.arange(c).view(1, c, 1) * 0.25
        assert torch.equal(perm, perm[:, :1].expand(-1, c, -1))  # the channels of a pixel move together
        perm = perm[:, 0].long()
        assert torch.equal(perm.sort(1).values, torch.arange(side * side).expand(n, -1))  # a permutation
        assert (perm != torch.arange(side * side)).any(1).all()  # of every image
        distinct = len({tuple(r) for r in perm.tolist()})
        assert distinct == (n if per_image else 1)


def test_noise_sets_have_the_intended_pixels_and_random_labels(digits, public):
    info = digits.info
    u = build(digits, public, "uniform", n=2000)
    pu = px(u.x, info)
    assert u.x.shape == (2000, 1, 8, 8) and u.label_source == "random" and u.source_index is None
    assert pu.min() >= -1e-6 and pu.max() <= 1 + 1e-6 and abs(pu.mean().item() - 0.5) < 0.01
    assert abs(pu.std().item() - (1 / 12) ** 0.5) < 0.01
    assert set(u.y.tolist()) == set(range(10)) and abs(u.y.float().mean().item() - 4.5) < 0.3

    g = build(digits, public, "gaussian", {"sigma": 0.1}, n=2000)
    pg = px(g.x, info)
    assert pg.min() >= -1e-6 and pg.max() <= 1 + 1e-6
    assert abs(pg.mean().item() - 0.5) < 0.01 and abs(pg.std().item() - 0.1) < 0.005  # clipping: 5 sigma away
    wide = px(build(digits, public, "gaussian", n=2000).x, info)  # sigma 0.25: clipped at 2 sigma
    assert 0.2 < wide.std().item() < 0.25 and wide.min() >= -1e-6 and wide.max() <= 1 + 1e-6
    assert ((wide < 1e-6) | (wide > 1 - 1e-6)).float().mean() > 0.03  # clipped mass at both ends
    assert set(g.y.tolist()) == set(range(10)) and not torch.equal(g.y, u.y)


@pytest.mark.parametrize("name,params", [("permuted", None), ("uniform", None), ("gaussian", {"sigma": 0.3})])
def test_sets_are_deterministic_in_the_seed(digits, public, name, params):
    a, b = build(digits, public, name, params, seed=1), build(digits, public, name, params, seed=1)
    c = build(digits, public, name, params, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_gan_fakes_cycle_over_the_classes_and_the_cache_is_reused(digits, public, tmp_path):
    out = build(digits, public, "gan", TINY_GAN, n=25, cache=tmp_path)
    assert out.x.shape == (25, 1, 8, 8) and out.label_source == "conditional" and out.source_index is None
    assert out.y.tolist() == [i % 10 for i in range(25)]  # the conditioning class, cycling
    p = px(out.x, digits.info)
    assert p.min() >= 0 and p.max() <= 1  # the generator's tanh read as pixels
    files = sorted(tmp_path.iterdir())
    assert [f.name.startswith("ood-cgan-") and f.suffix == ".pt" for f in files] == [True]
    stamp = files[0].stat().st_mtime_ns
    again = build(digits, public, "gan", TINY_GAN, n=25, cache=tmp_path)
    assert torch.equal(again.x, out.x) and files[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    pub = torch.from_numpy(public)
    s = OodGanSettings(**TINY_GAN)
    fitted = train_ood_gan(digits.x_train[pub], digits.y_train[pub], digits.info, s, tmp_path, CPU, seed=0)
    assert fitted.source == "cache" and fitted.classes == list(range(10))
    other = build(digits, public, "gan", TINY_GAN, n=25, seed=1, cache=tmp_path)  # another seed: another GAN
    assert not torch.equal(other.x, out.x) and len(list(tmp_path.iterdir())) == 2
    # only the public points' classes are generated (classes 0-4 here)
    few = public[digits.y_train[torch.from_numpy(public)].numpy() < 5]
    half = build(digits, few, "gan", TINY_GAN, n=12, cache=tmp_path)
    assert half.y.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_gan_training_resumes_exactly_after_stop_after(digits, public, tmp_path):
    pub = torch.from_numpy(public)
    s = OodGanSettings(**TINY_GAN)
    x, y = digits.x_train[pub], digits.y_train[pub]
    whole = build(digits, public, "gan", TINY_GAN, n=20, seed=3, cache=tmp_path / "a")
    cache = tmp_path / "b"
    assert train_ood_gan(x, y, digits.info, s, cache, CPU, seed=3, stop_after=7) is None  # "killed" at step 7
    assert [f.name.endswith(".ckpt.pt") for f in cache.iterdir()] == [True]  # the step-5 checkpoint
    resumed = train_ood_gan(x, y, digits.info, s, cache, CPU, seed=3)
    assert resumed.source == "resumed" and resumed.start_step == 5
    assert [f.name.endswith(".ckpt.pt") for f in cache.iterdir()] == [False]  # removed once final
    again = build(digits, public, "gan", TINY_GAN, n=20, seed=3, cache=cache)
    assert torch.equal(again.x, whole.x) and torch.equal(again.y, whole.y)


def test_another_dataset_is_adapted_to_digits_shape(digits, public, tmp_path):
    # an .npz of 3x16x16 uint8 images, each one flat colour (r, g, b): grey after adaptation = (r+g+b)/3
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(60, 3))
    imgs = np.broadcast_to(colours[:, None, None, :], (60, 16, 16, 3)).astype(np.uint8)
    path = tmp_path / "flat.npz"
    np.savez(path, x_train=imgs[:40], y_train=np.arange(40) % 3, x_test=imgs[40:], y_test=np.arange(20) % 3)
    params = {"name": "npz", "params": {"path": str(path)}}
    out = build(digits, public, "dataset", params, n=15)
    assert out.x.shape == (15, 1, 8, 8) and out.label_source == "random" and out.y.max() < 10
    p = px(out.x, digits.info).flatten(1)
    grey = colours[40:][out.source_index].mean(1) / 255
    assert torch.allclose(p, torch.tensor(grey, dtype=torch.float32)[:, None].expand(-1, 64), atol=2e-3)
    assert len(set(out.source_index.tolist())) == 15 and out.source_index.max() < 20
    train = build(digits, public, "dataset", {**params, "split": "train"}, n=15)
    assert train.source_index.max() < 40 and not torch.equal(train.x, out.x)
    # a synthetic image set of another size: resized 16x16 -> 8x8, pixels in [0, 1] (clamped)
    syn = build(digits, public, "dataset", {"name": "synthetic", "params": {"kind": "image", "image_size": 16}},
                n=30)
    ps = px(syn.x, digits.info)
    assert syn.x.shape == (30, 1, 8, 8) and ps.min() >= -1e-5 and ps.max() <= 1 + 1e-5 and ps.std() > 0.05
    assert torch.equal(syn.x, build(digits, public, "dataset", {"name": "synthetic",
                                    "params": {"kind": "image", "image_size": 16}}, n=30).x)


def test_tabular_sets(public):
    data = load_dataset("synthetic", {"num_features": 12, "num_train": 300, "num_test": 100})
    lo, hi = data.x_train.amin(0), data.x_train.amax(0)
    idx = torch.from_numpy(pick_test_images(data, 50, 0))
    src = data.x_test[idx]
    perm = build(data, public, "permuted", n=50)
    assert perm.x.shape == (50, 12) and torch.equal(perm.y, data.y_test[idx])
    assert torch.equal(perm.x.sort(1).values, src.sort(1).values) and not torch.equal(perm.x, src)
    assert torch.equal(build(data, public, "scaled", n=50).x, 255 * src)
    for name, params in (("uniform", None), ("gaussian", {"sigma": 0.1})):
        out = build(data, public, name, params, n=2000)
        assert out.x.shape == (2000, 12) and out.label_source == "random"
        assert (out.x >= lo - 1e-5).all() and (out.x <= hi + 1e-5).all()
        unit = (out.x - lo) / (hi - lo)
        assert abs(unit.mean().item() - 0.5) < 0.02
    assert abs(((out.x - lo) / (hi - lo)).std().item() - 0.1) < 0.01
    for name in ("unnormalized", "dataset", "gan"):
        params = {"name": "digits"} if name == "dataset" else None
        with pytest.raises(SpecError, match="needs images; the data are tabular") as e:
            build(data, public, name, params, n=10)
        assert e.value.where == "ood.name"


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_errors_are_one_line_and_name_the_field(digits, public, tmp_path):
    cases = [
        (("nope", None), "ood.name", "unknown non-member set 'nope'"),
        (("gaussian", {"sigma": -1}), "ood.params", "sigma"),
        (("gaussian", {"mu": 1}), "ood.params", "unknown parameter of 'gaussian'"),
        (("scaled", {"factor": 0}), "ood.params", "factor"),
        (("dataset", {}), "ood.params", "name"),
        (("dataset", {"name": "nope"}), "ood.params.name", "unknown data set 'nope'"),
        (("dataset", {"name": "digits"}), "ood.params.name", "images of the audited data set"),
        (("dataset", {"name": "digits", "params": {"split_seed": 1}}), "ood.params.name", "audited"),
        (("dataset", {"name": "digits", "params": {"bad": 1}}), "ood.params.params", "unknown parameter"),
        (("dataset", {"name": "synthetic"}), "ood.params.name", "tabular inputs"),
        (("gan", {"batch_size": 10_000}), "ood.params.batch_size", "exceeds the 747 public points"),
    ]
    for (name, params), where, text in cases:
        with pytest.raises(SpecError) as e:
            build(digits, public, name, params, n=10, cache=tmp_path)
        assert e.value.where == where and text in _one_line(e), (name, params, str(e.value))
    # another data set's missing files: the hint names the set's own params, not the audited `data`
    from raymia.errors import DataError

    with pytest.raises(DataError) as e:
        build(digits, public, "dataset", {"name": "cifar10", "params": {"root": str(tmp_path / "none")}}, n=10)
    assert _one_line(e).endswith("under ood.params.params.root; set ood.params.params.download: true to fetch it, "
                                 "or see docs/data.md")
    with pytest.raises(SpecError) as e:
        build(digits, np.array([], dtype=np.int64), "gan", TINY_GAN, n=10, cache=tmp_path)
    assert "leaves none" in _one_line(e) and e.value.where == "ood.name"
    with pytest.raises(SpecError) as e:
        build(digits, public, "permuted", n=10_000)
    assert "the test split holds 450 inputs" in _one_line(e) and e.value.where == "ood"
    assert "(ood.size)" in _one_line(e) and "accepted: an ood.size of at most 450" in _one_line(e)  # what to change
    with pytest.raises(SpecError) as e:
        build(digits, public, "uniform", n=0, where="audit.ood")
    assert "positive integer" in _one_line(e) and e.value.where == "audit.ood"
    bare = load_dataset("synthetic", {"kind": "image", "image_size": 8})  # no mean/std
    with pytest.raises(SpecError) as e:
        build(bare, public, "unnormalized", n=10)
    assert "would be the test split itself" in _one_line(e)
    assert list(tmp_path.iterdir()) == []  # nothing trained for a refused set
