"""Model inversion in specs, audits and sweeps (raymia.inversion.protocol, raymia.data.split).

The class split (`data.private_classes`): the bank trains on private classes only, the public split holds
the public classes only; bad splits are one-line errors. An audit with `inversion:` reports `mi/<attack>/...`
metrics well above chance for an undefended digits target, writes image grids (also as MLflow artifacts)
and repeats nothing on a re-run. A sweep accepts `mi/...` objectives and prepares the evaluator and GMI's
GAN once on a Ray worker.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from raymia.errors import SpecError
from raymia.resolve import validate_spec
from raymia.spec import AuditSpec, SweepSpec

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough for seconds on one core; GMI's GAN still gives a digit prior.
GMI = {"name": "gmi", "params": {"per_class": 2, "steps": 100, "restarts": 2, "gan_steps": 150, "latent_dim": 16,
                                 "width": 16, "gan_loss": "dcgan", "n_critic": 1}}
MIFACE = {"name": "miface", "params": {"per_class": 2, "steps": 100, "restarts": 2}}


def spec_dict(tmp_path, **over) -> dict:
    d = {
        "name": "inv", "seed": 0,
        "data": {"name": "digits", "private_classes": 5},
        "plan": {"num_models": 4, "targets": [0]},
        "model": {"name": "mlp", "params": {"hidden": [128]}},
        "train": {"optimizer": "adam", "lr": 0.002, "epochs": 20, "batch_size": 64},
        "queries": ["identity"], "attacks": ["loss"],
        "bank": {"engine": "local", "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "raymia-tests"},
        "inversion": {"attacks": [MIFACE, GMI], "evaluator": {"epochs": 15}, "device": "cpu"},
        "output_dir": str(tmp_path / "runs"),
    }
    d.update(over)
    return d


def test_class_split_trains_on_private_classes_and_leaves_the_public_ones_public(tmp_path):
    from raymia.train.bank import BankContext

    spec = validate_spec(spec_dict(tmp_path, plan={"num_models": 4, "population": 300}))
    ctx = BankContext.from_spec(spec, setup=False)
    assert set(np.unique(ctx.audited_y)) == {0, 1, 2, 3, 4}
    assert set(np.unique(ctx.data.y_train.numpy()[ctx.public_index])) == {5, 6, 7, 8, 9}
    assert set(np.unique(ctx.data.y_test.numpy())) == {0, 1, 2, 3, 4}
    # the private points the plan does not audit are dropped: neither audited nor public
    assert len(ctx.plan.population) == 300
    assert int((ctx.data.y_train < 5).sum()) == 300
    # data without a class split keep their fingerprint (stored signals stay valid)
    plain = AuditSpec.model_validate({k: v for k, v in spec_dict(tmp_path).items() if k != "inversion"}
                                     | {"data": {"name": "digits"}})
    assert plain.model_dump(mode="json")["data"] == {"name": "digits", "params": {}}
    assert "inversion" not in plain.model_dump(mode="json")
    assert plain.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("over, where", [
    ({"data": {"name": "digits", "private_classes": 10}}, "data.private_classes"),
    ({"data": {"name": "digits", "private_classes": [0, 1], "public_classes": [1, 2]}}, "data.public_classes"),
    ({"data": {"name": "digits", "private_classes": [0, 12]}}, "data.private_classes"),
    ({"data": {"name": "digits"}}, "inversion.public"),
])
def test_bad_class_splits_are_one_line_errors(tmp_path, over, where):
    from raymia.inversion.protocol import inversion_data
    from raymia.train.bank import BankContext

    with pytest.raises(SpecError) as e:
        spec = validate_spec(spec_dict(tmp_path, **over))
        inversion_data(spec, BankContext.from_spec(spec, setup=False))
    assert e.value.where == where and "\n" not in str(e.value)


@pytest.mark.parametrize("inversion, where, text", [
    ({"attacks": [GMI], "min_public": 5000}, "inversion.public", "fewer than inversion.min_public"),
    ({"attacks": [GMI], "classes": [7]}, "inversion.classes", "not private"),
    ({"attacks": [{"name": "nope"}]}, "inversion.attacks.0.name", "nope"),
    ({"attacks": [GMI], "evaluator": {"model": "mlp", "params": {"hidden": [128]}}}, "inversion.evaluator.model",
     "another architecture"),
    ({"attacks": [GMI], "public": {"name": "digits"}}, "inversion.public", "overlap"),
])
def test_bad_inversion_settings_are_one_line_errors(tmp_path, inversion, where, text):
    from raymia.inversion.protocol import inversion_data
    from raymia.train.bank import BankContext

    with pytest.raises(SpecError) as e:
        spec = validate_spec(spec_dict(tmp_path, inversion=inversion))
        inversion_data(spec, BankContext.from_spec(spec, setup=False))
    assert e.value.where == where and text in str(e.value) and "\n" not in str(e.value)


def test_a_missing_public_data_set_names_the_inversion_fields_the_user_wrote(tmp_path):
    """`raymia check` (which reads the public data set as the audit will): a public MNIST whose files are
    missing says where to put them and what to set under inversion.public, not under the audited `data`."""
    import yaml

    from raymia.check import check_spec
    from raymia.errors import DataError

    root = tmp_path / "nomnist"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, inversion={
        "attacks": [MIFACE], "public": {"name": "mnist", "params": {"root": str(root)}}})))
    with pytest.raises(DataError) as e:
        check_spec(path)
    text = str(e.value)
    assert text.startswith(f"{root / 'MNIST' / 'raw'}: not found; expected torchvision's MNIST raw layout")
    assert text.endswith("under inversion.public.params.root; set inversion.public.params.download: true to "
                         "fetch it, or see docs/data.md")
    assert "data.params" not in text.replace("public.params", "")


def test_adapt_inputs_maps_another_data_sets_images_to_the_input_space(digits):
    from raymia.data.split import adapt_inputs
    from raymia.datainfo import DataInfo

    x = digits.x_train[:16]
    same = adapt_inputs(x, digits.info, digits.info)
    assert torch.allclose(same, x.clamp(*(((v - digits.info.mean[0]) / digits.info.std[0]) for v in (0, 1))), atol=1e-5)
    rgb = DataInfo(num_classes=10, input_shape=(3, 16, 16), kind="image", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    out = adapt_inputs(x, digits.info, rgb)
    assert out.shape == (16, 3, 16, 16)
    pixels = out * torch.tensor(rgb.std).view(1, 3, 1, 1) + torch.tensor(rgb.mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)  # grey repeated over the channels
    # the mean brightness survives the resize
    src = (x * digits.info.std[0] + digits.info.mean[0]).clamp(0, 1)
    assert torch.allclose(pixels[:, 0].mean((1, 2)), src[:, 0].mean((1, 2)), atol=0.02)


def test_audit_with_inversion_reports_mi_metrics_grids_and_repeats_nothing(tmp_path, caplog, capsys):
    from mlflow.tracking import MlflowClient

    from raymia.audit import run_audit

    spec = validate_spec(spec_dict(tmp_path))
    with caplog.at_level(logging.INFO, logger="raymia"):
        res = run_audit(spec, console=False)
    m = res.flat_metrics()
    # an undefended target: both attacks' reconstructions are recognised far above chance (1/5)
    assert m["mi/gmi/top1"] >= 0.6 and m["mi/miface/top1"] >= 0.6, m
    assert math.isnan(m["mi/gmi/top5"])  # 5 private classes: all in the evaluator's top 5, so undefined
    assert json.loads((res.out_dir / "result.json").read_text())["inversion"]["attacks"]["gmi"]["top5"] is None
    assert m["mi/gmi/knn_dist"] > 0 and m["mi/gmi/fid"] > 0
    assert m["std/mi/gmi/top1"] is None  # one inverted target
    # the strongest inversion attack, metric by metric: the highest top-1, the lowest KNN distance
    assert m["mi/worst/top1"] == max(m["mi/gmi/top1"], m["mi/miface/top1"])
    assert m["mi/worst/knn_dist"] == min(m["mi/gmi/knn_dist"], m["mi/miface/knn_dist"])
    assert m["mi/worst/fid"] == min(m["mi/gmi/fid"], m["mi/miface/fid"])
    from raymia.audit import print_audit_table

    capsys.readouterr()
    print_audit_table(res)  # the console's table says which attack mi/worst/... takes each value from
    out = capsys.readouterr().out
    assert "model inversion: 5 private classes" in out and "bold: the strongest attack on each metric" in out
    inv_json = json.loads((res.out_dir / "result.json").read_text())["inversion"]
    strongest = inv_json["strongest"]
    assert m[f"mi/{strongest['top1']}/top1"] == m["mi/worst/top1"]
    assert m[f"mi/{strongest['knn_dist']}/knn_dist"] == m["mi/worst/knn_dist"]
    page = (res.out_dir / "report.html").read_text()
    assert "the strongest attack on each metric" in page and page.count("<b>") >= 4
    assert m["test_accuracy"] > 0.9
    assert ("  inversion top-1: " + ", ".join(f"{a} {100 * m[f'mi/{a}/top1']:.2f}%" for a in res.inversion.attacks)
            in repr(res).splitlines())
    for key in ("gmi", "miface"):
        assert (res.out_dir / f"inversion-{key}.png").stat().st_size > 1000
    client = MlflowClient(spec.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("raymia-tests").experiment_id])[0]
    assert {"inversion-gmi.png", "inversion-miface.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["mi/gmi/top1"] == pytest.approx(m["mi/gmi/top1"])
    assert "training target 0 alone" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raymia"):
        again = run_audit(spec, console=False, track=False)
    assert again.flat_metrics()["mi/gmi/top1"] == m["mi/gmi/top1"]
    assert again.flat_metrics()["mi/miface/knn_dist"] == m["mi/miface/knn_dist"]
    assert "training target" not in caplog.text and "training the GAN" not in caplog.text


def test_reconstructions_are_compared_with_the_images_the_target_trained_on(tmp_path):
    """KNN distance and FID compare with target t's members, as the official evaluation codes compare with
    the target's private training set; the evaluator still trains on every private image."""
    from raymia.inversion.protocol import inversion_data, training_images
    from raymia.train.bank import BankContext

    spec = validate_spec(spec_dict(tmp_path))
    ctx = BankContext.from_spec(spec, setup=False)
    seen = []
    for t in (0, 1):
        x, y = training_images(spec, ctx, t)
        idx = torch.from_numpy(ctx.plan.members_of(t))
        assert torch.equal(x, ctx.data.x_train[idx]) and torch.equal(y, ctx.data.y_train[idx])
        assert set(y.tolist()) == set(range(5))
        seen.append(set(idx.tolist()))
    # a pair: model 1 trained on the other half of the population
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == ctx.plan.population.size
    data = inversion_data(spec, ctx)
    assert data.private_x.shape[0] == ctx.plan.population.size + ctx.data.x_test.shape[0]


def test_sweep_accepts_mi_objectives_and_prepares_on_a_ray_worker(tmp_path, ray_local):
    from raymia.inversion.protocol import cache_dir, prepare
    from raymia.sweep import _prepare_inversion, validate_sweep

    d = spec_dict(tmp_path, inversion={"attacks": [GMI], "evaluator": {"epochs": 5}, "device": "cpu"})
    d["sweep"] = {"defense": "label_smoothing", "objectives": [{"metric": "test_accuracy", "mode": "max"},
                                                                {"metric": "mi/gmi/top1", "mode": "min"}]}
    spec = validate_spec(d, SweepSpec)
    validate_sweep(spec, setup=False)
    worst = validate_spec({**d, "sweep": {**d["sweep"], "objectives": [{"metric": "mi/worst/knn_dist", "mode": "max"}]}},
                          SweepSpec)
    validate_sweep(worst, setup=False)
    bad = validate_spec({**d, "sweep": {**d["sweep"], "objectives": [{"metric": "mi/miface/top1", "mode": "min"}]}},
                        SweepSpec)
    with pytest.raises(SpecError, match="mi/INVERSION_ATTACK") as e:
        validate_sweep(bad, setup=False)
    assert e.value.where == "sweep.objectives.0.metric"

    _prepare_inversion(spec)
    files = sorted(p.name.split("-")[0] for p in cache_dir(spec).glob("*.pt"))
    assert files == ["evaluator", "gmi"]
    assert prepare(spec) == {"evaluator": "cached", "gmi": "GAN cache"}  # nothing left to fit


def test_check_counts_the_inversion_compute(tmp_path, digits):
    import yaml

    from raymia.check import check_spec, count_flops
    from raymia.inversion.registry import inversion_flops

    _, fwd = count_flops("mlp", {"hidden": [128]}, digits.info, 1)
    p = MIFACE["params"]
    assert inversion_flops("miface", p, digits.info, fwd, 5) == p["steps"] * p["restarts"] * p["per_class"] * 5 * 3 * fwd
    # GMI: the latent search grows linearly with its steps, the GAN's training with its steps
    base = inversion_flops("gmi", GMI["params"], digits.info, fwd, 5)
    more = inversion_flops("gmi", {**GMI["params"], "steps": 200}, digits.info, fwd, 5)
    longer_gan = inversion_flops("gmi", {**GMI["params"], "gan_steps": 300}, digits.info, fwd, 5)
    assert more - base > 0 and longer_gan - base > 0
    assert inversion_flops("gmi", {**GMI["params"], "steps": 300}, digits.info, fwd, 5) - base == pytest.approx(
        2 * (more - base))
    one, two = (inversion_flops("plg_mi", {"steps": n}, digits.info, fwd, 5) for n in (100, 200))
    assert two - one == pytest.approx(100 * 5 * 1 * 5 * 3 * (two - one) / (100 * 5 * 1 * 5 * 3))  # finite, linear
    assert inversion_flops("plg_mi", {"steps": 300}, digits.info, fwd, 5) - one == pytest.approx(2 * (two - one))
    one, two = (inversion_flops("ked_mi", {"steps": n}, digits.info, fwd, 5) for n in (100, 200))
    assert two > one and inversion_flops("ked_mi", {"steps": 300}, digits.info, fwd, 5) - one == pytest.approx(
        2 * (two - one))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path)))
    rows = dict(check_spec(path).rows)
    assert rows["inversion"].startswith("miface, gmi on 1 target(s), 5 private classes, 672 public images")
    assert "of an H100" in rows["inversion"]


def _class_images(rng, k: int, n: int, c: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [k*n, size, size, c]: each class a bright square at its own place, plus noise."""
    x = rng.integers(0, 60, size=(k * n, size, size, c)).astype(np.uint8)
    y = np.repeat(np.arange(k), n)
    s = size // 4
    for i, label in enumerate(y):
        r, col = divmod(int(label) % 9, 3)
        x[i, r * s:(r + 2) * s, col * s:(col + 2) * s] = 220
    return x, y


@pytest.mark.parametrize("kind, shape", [("npz", (1, 28, 28)), ("npz", (3, 32, 32)), ("imagefolder", (3, 64, 64))],
                         ids=["mnist-style", "cifar-style", "celeba-style-64"])
def test_inversion_runs_on_mnist_cifar_and_64x64_imagefolder_shapes(tmp_path, kind, shape):
    from PIL import Image

    from raymia.audit import run_audit

    c, size, _ = shape
    rng = np.random.default_rng(0)
    xtr, ytr = _class_images(rng, 6, 12, c, size)
    xte, yte = _class_images(rng, 6, 3, c, size)
    if kind == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, x_train=xtr[..., 0] if c == 1 else xtr, y_train=ytr, x_test=xte[..., 0] if c == 1 else xte,
                 y_test=yte)
        data = {"name": "npz", "params": {"path": str(path)}, "private_classes": 3}
    else:  # torchvision ImageFolder layout, as a CelebA identity split would be stored
        for split, xs, ys in (("train", xtr, ytr), ("test", xte, yte)):
            for i, (img, label) in enumerate(zip(xs, ys, strict=True)):
                folder = tmp_path / "faces" / split / f"id{label:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{i}.png")
        data = {"name": "imagefolder", "params": {"root": str(tmp_path / "faces"), "image_size": 64},
                "private_classes": [0, 2, 4]}
    tiny_gmi = {"name": "gmi", "params": {"per_class": 1, "steps": 5, "restarts": 1, "gan_steps": 3, "width": 4,
                                          "latent_dim": 8, "gan_batch_size": 8, "gan_loss": "dcgan", "n_critic": 1}}
    spec = validate_spec(spec_dict(
        tmp_path, data=data, train={"optimizer": "adam", "lr": 0.002, "epochs": 2, "batch_size": 16},
        model={"name": "cnn", "params": {"channels": [4, 8], "hidden": 16}}, tracking={"enabled": False},
        inversion={"attacks": [tiny_gmi, {"name": "miface", "params": {"steps": 5, "restarts": 1}}],
                   "min_public": 30, "evaluator": {"model": "mlp", "params": {"hidden": [32]}, "epochs": 2},
                   "device": "cpu"}))
    res = run_audit(spec, console=False)
    assert res.inversion.evaluator["classes"] == ([0, 1, 2] if kind == "npz" else [0, 2, 4])
    assert res.inversion.evaluator["public_images"] == 36 and res.inversion.evaluator["private_images"] == 36 + 9
    for key in ("gmi", "miface"):
        top1 = res.flat_metrics()[f"mi/{key}/top1"]
        assert 0 <= top1 <= 1 and np.isfinite(res.flat_metrics()[f"mi/{key}/fid"])
        with Image.open(res.out_dir / f"inversion-{key}.png") as img:  # 2 cells per row of size x size images
            assert img.size[0] == 2 * (size * max(1, -(-64 // size)) + 2) + 2
