"""Auditing the user's own model (`target:`, `model.name: module:function`, `train.function`): the target
joined to the signals gives exactly the scores of a bank target with the same shadows; its files are read
safely and every bad one is one line naming the field; the three examples in examples/ run end to end."""

from __future__ import annotations

import json
import logging
import pickle
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import raymia
from raymia.errors import SpecError
from raymia.target import ExternalTarget, load_checkpoint, load_target, read_members, with_target
from tests.conftest import chromium_page, decoded_images

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# the known answer: the user's target with the bank's shadows == the bank's own target


def _bank_signals(m: int = 10, p: int = 60, c: int = 4, seed: int = 0) -> raymia.Signals:
    from raymia.data.plan import paired_keep

    rng = np.random.default_rng(seed)
    keep = paired_keep(m, p, rng)
    labels = rng.integers(0, c, p)
    # members get a confident correct logit, so attacks have something to find
    logits = rng.normal(size=(m, 2, p, c)).astype(np.float32)
    logits[np.arange(m)[:, None], :, np.arange(p)[None, :], labels[None, :]] += 1.5 * keep[:, :, None] + 0.5
    pop = rng.normal(size=(m, 2, 30, c)).astype(np.float32)
    return raymia.Signals(logits=logits, labels=labels, keep=keep, pop_logits=pop, pop_labels=rng.integers(0, c, 30))


@pytest.mark.parametrize("attack", ["loss", "modified_entropy", "lira_online", "lira_offline", "rmia_online",
                                    "rmia_offline", "label_only"])
def test_an_own_target_scores_exactly_as_the_bank_target_with_the_same_shadows(attack):
    full = _bank_signals()
    # bank target 0's shadows are models 2..9 (its pair, 1, left out): they are the user's bank here
    bank = raymia.Signals(logits=full.logits[2:], labels=full.labels, keep=full.keep[2:],
                          pop_logits=full.pop_logits[2:], pop_labels=full.pop_labels)
    own = ExternalTarget(points=np.arange(full.num_points), member=full.keep[0], logits=full.logits[0],
                         test_logits=full.pop_logits[0], queries=np.arange(2), source="checkpoint")
    joined = with_target(bank, own)
    assert joined.num_models == 9 and joined.shadows_of(8).tolist() == list(range(8))
    expected = raymia.run_attack(attack, None, full, 0)
    np.testing.assert_allclose(raymia.run_attack(attack, None, joined, 8), expected, rtol=1e-12, atol=1e-12)


def test_a_target_answering_some_points_and_one_query_is_scored_on_those_alone():
    full = _bank_signals()
    bank = raymia.Signals(logits=full.logits[2:], labels=full.labels, keep=full.keep[2:],
                          pop_logits=full.pop_logits[2:], pop_labels=full.pop_labels)
    pts = np.arange(0, full.num_points, 3)
    own = ExternalTarget(points=pts, member=full.keep[0, pts], logits=full.logits[0][:1, pts],
                         test_logits=full.pop_logits[0][:1], queries=np.arange(1), source="outputs")
    joined = with_target(bank, own)
    assert joined.logits.shape == (9, 1, pts.size, 4) and (joined.labels == full.labels[pts]).all()
    # the loss statistic is per point; only the threshold (fitted on the shadows at the scored points) moves
    diff = raymia.run_attack("loss", None, joined, 8) - raymia.run_attack("loss", None, full, 0)[pts]
    assert np.ptp(diff) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# members, checkpoints and outputs files


def test_members_read_from_lists_and_files_and_refused_outside_the_split(tmp_path):
    np.save(tmp_path / "m.npy", np.array([5, 1, 1, 3]))
    mask = np.zeros(10, dtype=bool)
    mask[[2, 4]] = True
    np.save(tmp_path / "mask.npy", mask)
    (tmp_path / "m.txt").write_text("7\n0\n")
    (tmp_path / "m.csv").write_text("1,2, 3\n")
    (tmp_path / "m.json").write_text("[9, 8]")
    assert read_members([3, 1], 10).tolist() == [1, 3]
    assert read_members(str(tmp_path / "m.npy"), 10).tolist() == [1, 3, 5]
    assert read_members(str(tmp_path / "mask.npy"), 10).tolist() == [2, 4]
    assert read_members(str(tmp_path / "m.txt"), 10).tolist() == [0, 7]
    assert read_members(str(tmp_path / "m.csv"), 10).tolist() == [1, 2, 3]
    assert read_members(str(tmp_path / "m.json"), 10).tolist() == [8, 9]
    with pytest.raises(SpecError, match=r"^target.members: index 10 is outside the training split \(0..9\)"):
        read_members([1, 10], 10)
    with pytest.raises(SpecError, match=r"target.members \(.*nope.npy\): file not found$"):
        read_members(str(tmp_path / "nope.npy"), 10)
    # a relative path is read from the current folder, which the error names
    with pytest.raises(SpecError, match=r"^target.members \(nope.txt\): file not found \(a relative path, looked "
                                        r"for in the current folder /"):
        read_members("nope.txt", 10)
    (tmp_path / "folder.npy").mkdir()  # it exists, so "file not found" misled
    with pytest.raises(SpecError, match=r"folder.npy\): is a folder; give the path of a file$"):
        read_members(str(tmp_path / "folder.npy"), 10)
    (tmp_path / "bad.txt").write_text("1 two 3")
    with pytest.raises(SpecError, match=r"bad.txt\): not a list of integer indices"):
        read_members(str(tmp_path / "bad.txt"), 10)
    (tmp_path / "notes.npy").write_text("1 2 3")  # not numpy's: no word of pickles
    with pytest.raises(SpecError, match=r"notes.npy\): not a list of integer indices: not a .npy array \(numpy.save "
                                        r"writes one\)$"):
        read_members(str(tmp_path / "notes.npy"), 10)
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(SpecError, match=r"unknown file type '.pt'; accepted: .npy, .json, .txt, .csv"):
        read_members(str(tmp_path / "m.pt"), 10)
    np.save(tmp_path / "short.npy", np.zeros(4, dtype=bool))
    with pytest.raises(SpecError, match=r"a boolean mask must cover the 10 training points"):
        read_members(str(tmp_path / "short.npy"), 10)


def _net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))


class _Boom:
    """A pickle that would write a file when unpickled: weights_only must refuse it before it runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_checkpoints_load_weights_only_and_a_misfit_is_one_line(tmp_path):
    src = _net()
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        dst = load_checkpoint(str(tmp_path / name), _net(), "net:build")
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))

    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(SpecError, match=r"^target.checkpoint \(.*wide.pt\): does not fit model 'net:build': "
                                        r"1.weight is \[16, 64\] in the file and \[8, 64\] in the model"):
        load_checkpoint(str(tmp_path / "wide.pt"), _net(), "net:build")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SpecError, match=r"4 tensors missing \(1.weight, 1.bias, 3.weight, ...\); 1 unexpected \(fc.weight\)"):
        load_checkpoint(str(tmp_path / "other.pt"), _net(), "net:build")

    torch.save(src, tmp_path / "whole-model.pt")  # a pickled module, not weights
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Boom(tmp_path / "pwned.txt"), f)  # pickle's protocol 4 or 5, where torch.save writes 2
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(SpecError, match=r"whole-model.pt\): not a weights file that torch.load\(weights_only=True\) "
                                            r"reads \(save the model's state_dict\(\) with torch.save\): Unsupported "
                                            r"global: GLOBAL torch.nn.modules.container.Sequential") as e:
            load_checkpoint(str(tmp_path / "whole-model.pt"), _net(), "net:build")
        # torch's reason, not its advice to load with weights_only=False, and no terminal colours
        assert "weights_only` set to `False`" not in str(e.value) and "\x1b" not in str(e.value)
        with pytest.raises(SpecError, match="not a weights file"):
            load_checkpoint(str(tmp_path / "evil.pt"), _net(), "net:build")
    assert [str(w.message) for w in said] == []  # the one line, not torch's pickle-protocol warning before it
    assert not (tmp_path / "pwned.txt").exists()  # nothing of the pickle ran
    # bytes that are no pickle at all: the legacy unpickler fails with a KeyError, which was a traceback
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(SpecError, match=r"notes.pt\): not a weights file that torch.load\(weights_only=True\) "
                                        r"reads \(save the model's state_dict\(\) with torch.save\): KeyError"):
        load_checkpoint(str(tmp_path / "notes.pt"), _net(), "net:build")


def _spec(tmp_path, **target) -> dict:
    return {"name": "own", "plan": {"num_models": 4}, "queries": ["identity"], "bank": {"engine": "local"},
            "model": {"name": "mlp", "params": {"hidden": [8]}}, "target": target,
            "output_dir": str(tmp_path / "runs"), "tracking": {"enabled": False}}


def _ctx(spec):
    from raymia.train.bank import BankContext

    return BankContext.from_spec(spec, setup=False)


def test_an_untrained_checkpoint_warns_that_its_accuracy_on_its_members_is_near_chance(tmp_path, caplog):
    from raymia.models import build_model

    spec = raymia.as_spec(_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"), members=list(range(0, 1347, 2))))
    ctx = _ctx(spec)
    torch.manual_seed(0)
    torch.save(build_model("mlp", {"hidden": [8]}, ctx.data.info).state_dict(), tmp_path / "t.pt")
    with caplog.at_level(logging.WARNING, logger="raymia"):
        target = load_target(spec, ctx)
    assert target.member.sum() == 674 and target.logits.shape == (1, 1347, 10)
    assert target.test_logits.shape == (1, ctx.data.x_test.shape[0], 10)
    assert any("near chance (10.0%)" in r.getMessage() and "674 members" in r.getMessage() for r in caplog.records)

    # `raymia check` reads and queries the checkpoint as the audit will, training nothing
    import yaml

    from raymia.check import check_spec

    (tmp_path / "own.yaml").write_text(yaml.safe_dump(_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"),
                                                            members=list(range(0, 1347, 2)))))
    rows = dict(check_spec(tmp_path / "own.yaml").rows)
    assert rows["target"].startswith("yours, from checkpoint") and "674 members among the 1,347 audited" in rows["target"]
    assert "4 models, the shadows of your target" in rows["plan"]

    every = raymia.as_spec(_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"), members=list(range(1347))))
    with pytest.raises(SpecError, match=r"^target.members: all of the 1347 audited points the target answers are "
                                        r"its members"):
        load_target(every, ctx)


def test_members_it_did_not_train_on_warn_that_its_loss_there_is_no_lower(tmp_path, caplog):
    import torch.nn.functional as F

    from raymia.models import build_model

    evens, odds = list(range(0, 1347, 2)), list(range(1, 1347, 2))
    spec = raymia.as_spec(_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"), members=evens))
    ctx = _ctx(spec)
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [8]}, ctx.data.info)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):  # trained on the even indices only
        opt.zero_grad()
        F.cross_entropy(model(ctx.data.x_train[evens]), ctx.data.y_train[evens]).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "t.pt")
    with caplog.at_level(logging.WARNING, logger="raymia"):
        load_target(spec, ctx)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    wrong = raymia.as_spec(_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"), members=odds))
    with caplog.at_level(logging.WARNING, logger="raymia"):
        load_target(wrong, ctx)
    (record,) = caplog.records
    assert record.getMessage().startswith("target: its mean loss on its 673 members (") and \
        "is no lower than on the 674 audited points it did not train on" in record.getMessage()


def _outputs(tmp_path, **arrays):
    path = tmp_path / "out.npz"
    np.savez(path, **arrays)
    return str(path)


def test_outputs_files_are_checked_field_by_field(tmp_path):
    spec = raymia.as_spec(_spec(tmp_path, outputs="x.npz", members=[0, 2, 4]))
    ctx = _ctx(spec)
    t = ctx.data.x_test.shape[0]
    probs = np.full((5, 10), 0.1)
    good = {"indices": np.array([0, 1, 2, 3, 4]), "probs": probs, "test_probs": np.full((t, 10), 0.1)}

    def load(**arrays):
        d = spec.model_copy(update={"target": spec.target.model_copy(update={"outputs": _outputs(tmp_path, **arrays)})})
        return load_target(d, ctx)

    target = load(**good)
    assert target.points.tolist() == [0, 1, 2, 3, 4] and target.member.tolist() == [True, False, True, False, True]
    np.testing.assert_allclose(np.exp(target.logits[0]), probs, rtol=1e-6)  # probabilities kept as their log
    cases = [
        ({k: v for k, v in good.items() if k != "indices"}, r"lacks 'indices'"),
        ({**good, "logits": probs}, r"needs exactly one of logits or probs, found \['logits', 'probs'\]"),
        ({**good, "probs": np.full((5, 3), 1 / 3)}, r"probs must be \[N, 10\]"),
        ({**good, "probs": probs * 2}, r"probs must be probabilities"),
        ({**good, "test_probs": np.full((7, 10), 0.1)}, rf"test outputs cover 7 points; the test split has {t}"),
        ({**good, "indices": np.array([0, 1, 2, 3, 9999])}, r"indices must lie in the training split \(0..1346\)"),
        ({**good, "indices": np.array([0, 1, 2, 3, 3])}, r"indices repeat a point"),
        ({**good, "probs": probs[None].repeat(2, 0), "test_probs": good["test_probs"][None].repeat(2, 0),
          "queries": np.array(["identity", "hflip"])},
         r"answers query 'hflip', which the spec's queries \['identity'\] lack"),
    ]
    for arrays, message in cases:
        with pytest.raises(SpecError, match=r"^target.outputs \(.*out.npz\): " + message):
            load(**arrays)
    np.save(tmp_path / "plain.npy", probs)
    d = spec.model_copy(update={"target": spec.target.model_copy(update={"outputs": str(tmp_path / "plain.npy")})})
    with pytest.raises(SpecError, match=r"expected an .npz archive"):
        load_target(d, ctx)
    # bytes numpy did not write: np.load took them for a pickle ("contains pickled (object) data", with its
    # advice to load with allow_pickle=True)
    (tmp_path / "notes.npz").write_text("indices,probs\n")
    d = spec.model_copy(update={"target": spec.target.model_copy(update={"outputs": str(tmp_path / "notes.npz")})})
    with pytest.raises(SpecError, match=r"notes.npz\): not an .npz archive: numpy.savez writes a zip file") as e:
        load_target(d, ctx)
    assert "pickle" not in str(e.value)


def test_what_a_target_or_training_function_excludes_is_refused_in_the_spec(tmp_path):
    base = _spec(tmp_path, checkpoint="t.pt", members=[1])
    with pytest.raises(SpecError, match=r"^target: give the target's checkpoint \(its weights\) or its outputs"):
        raymia.as_spec({**base, "target": {"members": [1]}})
    with pytest.raises(SpecError, match=r"^plan.targets: with target: your model is the one attacked"):
        raymia.as_spec({**base, "plan": {"num_models": 4, "targets": [2]}})
    # the spec.yaml written beside the report (every default spelled out) runs again
    from raymia.audit import write_spec_file

    spec = raymia.as_spec(base)
    assert raymia.as_spec(write_spec_file(spec, tmp_path / "spec.yaml", "the spec")) == spec
    with pytest.raises(SpecError, match=r"^target: a sweep searches defenses"):
        raymia.as_spec(base, kind=raymia.SweepSpec)
    with pytest.raises(SpecError, match=r"^attacker: with target: the shadows follow the spec's defense"):
        raymia.as_spec({**base, "attacker": "non_adaptive"})
    fn = {"epochs": 2, "function": "os.path:join"}
    with pytest.raises(SpecError, match=r"^train.function: a training function trains the models its own way.*"
                                        r"use defense: none"):
        raymia.as_spec({**base, "train": fn, "defense": "hamp"})


def _public_npz(tmp_path) -> str:
    """Another data set for the attacker: scikit-learn's digits transposed (none is an audited image)."""
    from sklearn.datasets import load_digits

    images = (load_digits().images.transpose(0, 2, 1) * 16).clip(0, 255).astype(np.uint8)
    path = tmp_path / "public.npz"
    np.savez(path, x_train=images, y_train=np.zeros(len(images), np.int64), x_test=images[:10],
             y_test=np.zeros(10, np.int64))
    return str(path)


def test_your_model_is_inverted_from_its_checkpoint(tmp_path, caplog):
    import torch.nn.functional as F

    from raymia.models import build_model

    members = list(range(0, 1347, 2))
    spec_dict = {**_spec(tmp_path, checkpoint=str(tmp_path / "t.pt"), members=members),
                 "model": {"name": "mlp", "params": {"hidden": [64]}},
                 "inversion": {"attacks": [{"name": "miface", "params": {"per_class": 2, "steps": 100, "restarts": 2}},
                                           {"name": "brep_mi", "params": {"per_class": 2, "patience": 100, "latent_dim": 16,
                                                                          "width": 16, "gan_steps": 150,
                                                                          "gan_loss": "dcgan", "n_critic": 1}}],
                               "public": {"name": "npz", "params": {"path": _public_npz(tmp_path), "num_classes": 2}},
                               "evaluator": {"epochs": 15}, "device": "cpu"}}
    spec = raymia.as_spec(spec_dict)
    ctx = _ctx(spec)
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [64]}, ctx.data.info)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = ctx.data.x_train[members], ctx.data.y_train[members]
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "t.pt")

    with caplog.at_level(logging.INFO, logger="raymia"):
        result = raymia.run_audit(spec)
    assert "inversion: inverting your model from" in caplog.text
    inv = result.inversion
    assert inv.targets == result.targets == [4] and inv.evaluator["classes"] == list(range(10))
    metrics = result.flat_metrics()
    for attack in ("miface", "brep_mi"):
        top1 = metrics[f"mi/{attack}/top1"]
        print(f"{attack}: top-1 {top1:.2f}, KNN distance {metrics[f'mi/{attack}/knn_dist']:.2f}")
        assert top1 >= 0.3, attack  # chance: 0.1 (measured: miface 0.85, brep_mi 0.35)
    # another checkpoint is another model: its reconstructions are not the cached ones
    recons = lambda: sorted((tmp_path / "runs" / "cache" / "inversion").glob("recon-*.pt"))  # noqa: E731
    first = recons()
    assert len(first) == 2
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    raymia.run_audit(spec)
    assert len(recons()) == 4 and set(first) < set(recons())
    # KNN distance and FID compare with the images your model trained on: a class it never saw is refused
    from raymia.inversion.protocol import run_inversions

    no_nines = [i for i in members if int(ctx.data.y_train[i]) != 9]
    spec9 = raymia.as_spec({**spec_dict, "target": {**spec_dict["target"], "members": no_nines}})
    with pytest.raises(SpecError, match=r"^inversion.classes: target 4 trained on no image of classes \[9\]"):
        run_inversions(spec9, _ctx(spec9), tmp_path)

    outputs = {**spec_dict, "target": {"outputs": "out.npz", "members": members}}
    with pytest.raises(SpecError, match=r"^inversion: model inversion needs your model's weights \(target.checkpoint\)"):
        raymia.as_spec(outputs)
    with pytest.raises(SpecError, match=r"^inversion.targets: with target: your model is the one target to invert"):
        raymia.as_spec({**spec_dict, "inversion": {**spec_dict["inversion"], "targets": 2}})
    with pytest.raises(SpecError, match=r"^inversion.public: .*with target: your model's classes are all private, so "
                                        r"give another data set as inversion.public"):
        raymia.as_spec({**spec_dict, "inversion": {**spec_dict["inversion"], "public": "classes"}})


def test_import_paths_fail_in_one_line_and_their_source_is_in_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"^model.name: cannot import 'no_such_module_xyz': no such module"):
        raymia.as_spec({"model": "no_such_module_xyz:build"})
    with pytest.raises(SpecError, match=r"^model.name: module 'json' has no attribute 'nothing'"):
        raymia.as_spec({"model": "json:nothing"})
    with pytest.raises(SpecError, match=r"^model.name: 'json:' is not an import path; expected module:function"):
        raymia.as_spec({"model": "json:"})
    (tmp_path / "broken_mod_xyz.py").write_text("raise ValueError('bad config')\n")
    with pytest.raises(SpecError, match=r"^model.name: importing 'broken_mod_xyz' failed: ValueError: bad config"):
        raymia.as_spec({"model": "broken_mod_xyz:build"})

    (tmp_path / "user_net_xyz.py").write_text(
        "from torch import nn\n\ndef build(params, info):\n    return nn.Linear(64, info.num_classes)\n")
    spec = raymia.as_spec({"model": "user_net_xyz:build"})
    assert set(spec.bank_dict()["code"]) == {"model.name"}
    before = spec.fingerprint()
    (tmp_path / "user_net_xyz.py").write_text(
        "from torch import nn\n\ndef build(params, info):\n    return nn.Linear(64, info.num_classes, bias=False)\n")
    assert spec.fingerprint() != before  # edited code: the bank is trained again, not reused
    assert "code" not in raymia.as_spec({}).bank_dict()  # registered names: fingerprints as before

    # a defense by import path is a Defense subclass, and carries that path as its name
    (tmp_path / "user_defense_xyz.py").write_text(
        "from raymia.defenses.base import Defense\n\nclass Smooth(Defense):\n    pass\n\n"
        "def not_a_defense(params, info):\n    return None\n")
    from raymia.datainfo import DataInfo
    from raymia.defenses.base import build_defense

    built = build_defense("user_defense_xyz:Smooth", {}, DataInfo(num_classes=10, input_shape=(64,), kind="tabular"))
    assert built.name == "user_defense_xyz:Smooth" and type(built).__mro__[1].__name__ == "Smooth"
    with pytest.raises(SpecError, match=r"^defense.name: 'user_defense_xyz:not_a_defense' is not a subclass of "
                                        r"raymia.defenses.base.Defense"):
        raymia.as_spec({"defense": "user_defense_xyz:not_a_defense"})


def test_an_edited_module_runs_as_edited_in_the_same_session(tmp_path, monkeypatch):
    """A notebook audits with its model and attack files by import path, edits both and audits again: the
    new bank (its fingerprint holds the new source) trains the edited model and the edited attack scores it.
    Python kept the first versions in sys.modules, so the new fingerprint's signals were the old model's and
    the report the old attack's."""
    import sys

    import numpy as np

    monkeypatch.chdir(tmp_path)
    net, atk = tmp_path / "edit_net_xyz.py", tmp_path / "edit_atk_xyz.py"
    net.write_text("from torch import nn\n\ndef build(params, info):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, info.num_classes))\n")
    atk.write_text("def score(signals, target, params):\n    return +signals.logits[target, 0].max(-1)\n")
    d = {"name": "edited", "plan": {"num_models": 4, "population": 100}, "model": "edit_net_xyz:build",
         "attacks": ["edit_atk_xyz:score"], "bank": {"engine": "local"}, "train": {"epochs": 1},
         "tracking": {"enabled": False}, "output_dir": str(tmp_path / "runs")}
    try:
        first = raymia.run_audit(d, console=False)
        assert np.abs(raymia.read_signals(first).logits).max() > 0.01
        net.write_text(net.read_text().replace("info.num_classes)", "info.num_classes), nn.Hardtanh(-1e-3, 1e-3)"))
        atk.write_text(atk.read_text().replace("+signals", "-signals"))
        second = raymia.run_audit(d, console=False)
        assert second.fingerprint != first.fingerprint and not second.reused_signals
        signals = raymia.read_signals(second)
        assert np.abs(signals.logits).max() <= 1e-3  # the edited model's outputs
        scores = -signals.logits[0, 0].max(-1).astype(np.float64)  # the edited attack's scores
        assert raymia.attack_metrics(scores, signals.keep[0])["auc"] == second.attacks["edit_atk_xyz:score"]["auc"]
    finally:
        sys.modules.pop("edit_net_xyz", None)
        sys.modules.pop("edit_atk_xyz", None)


def test_a_module_the_caller_imported_then_edited_runs_as_edited(tmp_path, monkeypatch):
    """The caller imports its module, edits the file, then names it in a spec: raymia's first read of it
    runs the edited code, which is the source its fingerprint holds. A module unchanged since the process
    started is not imported again."""
    import importlib
    import os
    import sys

    from raymia.plugins import import_object

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    edited, kept = tmp_path / "caller_edit_xyz.py", tmp_path / "caller_kept_xyz.py"
    try:
        edited.write_text("def build(params, info):\n    return 1\n")
        importlib.import_module("caller_edit_xyz")
        edited.write_text("def build(params, info):\n    return 222\n")
        assert import_object("caller_edit_xyz:build", "model.name")(None, None) == 222
        kept.write_text("with open('loads.txt', 'a') as f:\n    f.write('x')\n\ndef build(params, info):\n    return 1\n")
        t = kept.stat().st_mtime - 10 ** 6  # written long before this process started
        os.utime(kept, (t, t))
        importlib.import_module("caller_kept_xyz")
        assert import_object("caller_kept_xyz:build", "model.name")(None, None) == 1
        assert (tmp_path / "loads.txt").read_text() == "x"  # its body ran once
    finally:
        sys.modules.pop("caller_edit_xyz", None)
        sys.modules.pop("caller_kept_xyz", None)


# ---------------------------------------------------------------------------------------------------------
# the examples, end to end


def _example(name: str, tmp_path: Path) -> Path:
    where = tmp_path / name
    shutil.copytree(ROOT / "examples" / name, where)
    return where


def _run(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_example_own_model_checkpoint_and_builder_on_ray_workers_with_its_report(tmp_path):
    where = _example("own_model", tmp_path)
    _run([sys.executable, "train_target.py"], where)
    # the CLI on a warm Ray pool: its workers import net.py from the working directory, as the driver does
    console = _run([sys.executable, "-m", "raymia", "audit", "audit.yaml", "--set", "plan.num_models=4"], where)
    assert "target=yours (checkpoint)" in console
    (run,) = (where / "runs" / "audits").iterdir()
    r = json.loads((run / "result.json").read_text())
    assert r["target"] == {"source": "checkpoint", "points": 1347, "members": 673, "queries": 1}
    assert r["targets"] == [4] and r["spec"]["model"]["name"] == "net:build"
    assert r["utility"]["train_accuracy"] == 1.0 and r["utility"]["test_accuracy"] > 0.9  # the trained target
    assert r["attacks"]["lira_online"]["auc"] > 0.55  # it overfits, and the attacks see it
    from raymia.report.records import read_records

    points = read_records(run / "records.parquet")
    assert points.targets == [4] and points.member.sum() == 673 and points.index.tolist() == list(range(1347))
    assert list(points.scores) == ["loss", "modified_entropy", "lira_online", "lira_offline", "rmia_online"]
    members = np.load(where / "members.npy")
    assert all(v["index"] in members for v in r["vulnerable"])  # only members are listed as leaking
    _check_report_in_chromium(run / "report.html", r)


def _check_report_in_chromium(page: Path, r: dict) -> None:
    """Open report.html in headless Chromium and check what it shows: tables with the result's numbers,
    every figure decoded, the vulnerable records, the spec."""
    with chromium_page(page) as tab:
        assert tab.title() == f"raymia audit {r['name']}"
        text = tab.inner_text("body")
        assert "your model (checkpoint: 673 members among 1347 audited points), 4 shadows" in text
        auc = r["attacks"]["rmia_online"]["auc"]
        row = tab.locator("tr", has_text="rmia_online").first.inner_text()
        assert f"{auc:.4g}" in row
        # 674 non-members and 673 members: the levels below 1/674 are n/a for every attack, named once
        head = tab.locator("table", has_text="rmia_online").first.locator("th").all_inner_texts()
        assert "TPR@1%FPR" in head and "TPR@0.1%FPR" not in head and "TNR@0.1%FNR" not in head
        assert "not shown: TPR@0.1%FPR, TPR@0.01%FPR, TPR@0.001%FPR, TNR@0.1%FNR" in text
        sizes = decoded_images(tab)
        assert len(sizes) == 2 and all(w > 300 and h > 300 for _, w, h in sizes), sizes
        vulnerable = tab.locator("#vulnerable + p + table tbody tr")
        assert vulnerable.count() == len(r["vulnerable"]) > 0
        first = vulnerable.first.locator("td").all_inner_texts()
        assert first[1] == str(r["vulnerable"][0]["index"])
        assert "checkpoint: target.pt" in tab.inner_text("#spec")


def test_example_own_training_function_trains_every_shadow(tmp_path, monkeypatch):
    where = _example("own_training", tmp_path)
    monkeypatch.chdir(where)
    monkeypatch.syspath_prepend(str(where))
    runpy.run_path("train_target.py", run_name="__main__")
    # the example's recipe, wrapped to count its calls
    (where / "counting.py").write_text(
        "import recipe\n\ndef fit(job, params):\n    with open('calls.txt', 'a') as f:\n"
        "        f.write(f'{job.m} {len(job.x)}\\n')\n    return recipe.fit(job, params)\n")
    try:
        result = raymia.run_audit("audit.yaml", ["bank.engine=local", "tracking.enabled=false", "plan.num_models=4",
                                                 "train.function.name=counting:fit"])
    finally:
        for m in ("recipe", "counting"):
            sys.modules.pop(m, None)
    calls = [line.split() for line in (where / "calls.txt").read_text().splitlines()]
    assert sorted(int(m) for m, _ in calls) == [0, 1, 2, 3]  # every shadow, once
    assert {int(n) for _, n in calls} == {673, 674}  # each on its half of the training split
    assert result.target["source"] == "checkpoint" and result.utility["test_accuracy"] > 0.85
    assert set(result.spec.bank_dict()["code"]) == {"train.function.name"}
    assert result.attacks["lira_online"]["auc"] > 0.5


def test_example_black_box_outputs_only(tmp_path, monkeypatch):
    where = _example("black_box", tmp_path)
    monkeypatch.chdir(where)
    runpy.run_path("query_api.py", run_name="__main__")
    result = raymia.run_audit("audit.yaml", ["bank.engine=local", "tracking.enabled=false", "plan.num_models=4"])
    asked = np.load(where / "outputs.npz")["indices"]
    members = np.loadtxt(where / "members.txt", dtype=np.int64)
    assert result.target == {"source": "outputs", "points": 600, "members": int(np.isin(asked, members).sum()),
                             "queries": 1}
    assert result.points.index.tolist() == asked.tolist()
    assert result.utility["train_accuracy"] == 1.0 and result.utility["test_accuracy"] > 0.85
    assert result.attacks["rmia_online"]["auc"] > 0.55
    # another target against the same bank: the shadows are reused, the report is its own
    z = dict(np.load(where / "outputs.npz"))
    np.savez(where / "half.npz", indices=z["indices"][:300], probs=z["probs"][:300], test_probs=z["test_probs"])
    other = raymia.run_audit("audit.yaml", ["bank.engine=local", "tracking.enabled=false", "plan.num_models=4",
                                            "target.outputs=half.npz"], console=False)
    assert other.reused_signals and other.fingerprint == result.fingerprint and other.target["points"] == 300
    assert other.out_dir != result.out_dir and (result.out_dir / "result.json").is_file()
    assert other.out_dir.name.startswith(f"black-box-{result.fingerprint}-")
    signals = raymia.read_signals(result)  # the bank and the target's outputs, as the audit attacked them
    assert signals.num_models == 5 and signals.num_points == 600
    again = raymia.run_attack("rmia_online", None, signals, 4)
    assert raymia.attack_metrics(again, signals.keep[4])["auc"] == pytest.approx(result.attacks["rmia_online"]["auc"])
