"""The out-of-distribution evaluation (raymia.ood_audit): metrics by hand, and a real digits audit whose
overconfident model flags scaled inputs as members far more often than held-out data (Hintersdorf et al.)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from raymia.errors import SpecError
from raymia.ood_audit import set_metrics
from raymia.resolve import validate_spec
from raymia.spec import SweepSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_set_metrics_by_hand():
    members, others = np.array([3.0, 4, 5, 6]), np.array([1.0, 2, 5, 7])
    m = set_metrics(members, others, threshold=4.0, max_score=np.array([0.1, 0.2, 0.3, 0.9]))
    assert m["fpr"] == 0.5  # 5 and 7 are above 4
    assert m["precision"] == 0.5  # members above: 5, 6
    assert m["auroc"] == pytest.approx(9.5 / 16)  # pairs won: 2 + 2 + 2.5 + 3
    assert m["fpr_tpr95"] == 0.5  # the threshold keeping every member is 3: 5 and 7 pass it
    assert m["max_score_flagged"] == pytest.approx(0.6) and m["max_score_unflagged"] == pytest.approx(0.15)
    from sklearn.metrics import average_precision_score

    assert m["aupr"] == pytest.approx(average_precision_score([1] * 4 + [0] * 4, np.r_[members, others]))


@pytest.mark.parametrize("n", [4, 19, 20, 21, 40, 100, 200, 2500])
def test_fpr_at_95_tpr_is_the_first_roc_point_reaching_it(n):
    """As the paper's code: the FPR at the first ROC point (thresholds descending) whose TPR >= 0.95."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(n)
    members, others = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, 3 * n)
    fpr, tpr, _ = roc_curve(np.r_[np.ones(n), np.zeros(3 * n)], np.r_[members, others], drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95)]
    got = set_metrics(members, others, threshold=0.0, max_score=np.zeros(3 * n))["fpr_tpr95"]
    assert got == pytest.approx(expected)
    if n == 20:  # 19 of 20 members is 95%: the lowest member score is not needed
        assert got == (others >= np.sort(members)[1]).mean() < (others >= members.min()).mean()


def test_the_cut_flags_every_point_the_papers_rule_flags():
    """The paper's ThresholdAttack: roc_curve's threshold at argmax(tpr - fpr), then `score > threshold`.
    raymia's best_threshold cuts below the same group, so it flags a superset (docs/validity.md, OOD)."""
    from sklearn.metrics import roc_curve

    from raymia.attacks.mia.threshold import best_threshold

    def papers(scores, is_in):
        fpr, tpr, thresholds = roc_curve(is_in, scores)
        return thresholds[np.argmax(tpr - fpr)]

    # by hand: members .9 .7, non-members .2 .5: the group {.9, .7}; raymia cuts at .5, the paper at .7
    s, k = np.array([0.9, 0.7, 0.2, 0.5]), np.array([True, True, False, False])
    assert (best_threshold(s, k), papers(s, k)) == (0.5, 0.7)
    rng = np.random.default_rng(0)
    differ = 0
    for r in range(100):
        k = rng.random(60) < 0.5
        s = rng.normal(size=60) + k
        s = np.round(s, 1) if r % 2 else s  # tied and continuous
        test = rng.normal(size=300) * 2
        ours, theirs = test > best_threshold(s, k), test > papers(s, k)
        assert not (theirs & ~ours).any()
        differ += (ours != theirs).any()
    assert differ > 50


def _spec(tmp_path, **over):
    d = {"name": "ood", "seed": 0, "plan": {"num_models": 8, "population": 300, "targets": [0, 1]},
         "model": {"name": "mlp", "params": {"hidden": [256]}},
         "train": {"epochs": 40, "batch_size": 64, "lr": 0.002}, "queries": ["identity"],
         "attacks": ["loss", "entropy", "lira_online", "lira_offline"],
         "bank": {"engine": "local", "device": "cpu"},
         "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "raymia-tests"},
         "ood": {"size": 100, "sets": ["scaled", "permuted", {"name": "uniform", "label": "noise"}]},
         "output_dir": str(tmp_path / "runs")}
    d.update(over)
    return d


def test_scaled_inputs_are_flagged_far_more_often_than_held_out_data(tmp_path):
    from mlflow.tracking import MlflowClient

    from raymia.audit import run_audit

    spec = validate_spec(_spec(tmp_path))
    res = run_audit(spec, console=False)
    m = res.flat_metrics()
    for a in ("loss", "entropy"):  # an overconfident MLP (100% train accuracy): the paper's finding
        assert m[f"ood/{a}/scaled/fpr"] >= 0.9, m[f"ood/{a}/scaled/fpr"]
        assert m[f"ood/{a}/scaled/fpr"] > m[f"ood/{a}/held_out/fpr"] + 0.15
        assert m[f"ood/{a}/noise/fpr"] <= 0.05 and m[f"ood/{a}/noise/auroc"] > 0.95
        assert 0.5 < m[f"ood/{a}/recall"] <= 1.0
    # the held-out set's AUROC is the audit's own AUC (same scores, same members and non-members)
    assert m["ood/loss/held_out/auroc"] == pytest.approx(m["loss/auc"], abs=1e-12)
    assert m["ood/loss/fpr"] == pytest.approx(np.mean([m[f"ood/loss/{s}/fpr"] for s in ("scaled", "permuted", "noise")]))
    assert "ood/lira_online/fpr" not in m and "lira_online" in res.ood.skipped
    # members the attack finds are the ones the model is most confident about; scaled inputs even more so
    assert m["ood/loss/members/max_score_flagged"] > m["ood/loss/members/max_score_unflagged"]
    assert m["ood/loss/scaled/max_score_flagged"] > 0.99
    assert res.ood.label_sources == {"held_out": "true", "scaled": "source", "permuted": "source", "noise": "random"}
    assert m["std/ood/loss/scaled/fpr"] is not None  # two targets
    assert (res.out_dir / "ood_fpr.png").stat().st_size > 5000
    # its repr names each attack's FPR over the non-member sets, as the flat metric gives it
    assert ("  OOD FPR (mean over the sets): " + ", ".join(f"{a} {100 * m[f'ood/{a}/fpr']:.2f}%" for a in res.ood.attacks)
            in repr(res).splitlines())
    # each attack in one colour on both figures: lira_offline, the 4th attack and the 3rd with OOD results,
    # takes the 4th colour on roc.png and on ood_fpr.png
    from raymia.report.plots import PALETTE

    assert PALETTE[3] in _colours(res.out_dir / "roc.png") and PALETTE[3] in _colours(res.out_dir / "ood_fpr.png")
    assert PALETTE[2] not in _colours(res.out_dir / "ood_fpr.png")
    page = (res.out_dir / "report.html").read_text()  # what the threshold is, and where each set's labels come from
    assert "maximises TPR - FPR on a shadow model" in page and "scaled (source labels)" in page
    aurocs = re.findall(r"<td>[^<]*% / ([^<]*)</td>", page)  # each set's AUROC to 4 decimals: 1.0000, not 1
    assert aurocs and all(re.fullmatch(r"[01]\.\d{4}", a) for a in aurocs), aurocs
    client = MlflowClient(spec.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("raymia-tests").experiment_id])[0]
    assert "ood_fpr.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["ood/loss/scaled/fpr"] == pytest.approx(m["ood/loss/scaled/fpr"])
    # the non-member sets are part of the bank: without them, the same audited signals
    plain = run_audit(validate_spec({k: v for k, v in _spec(tmp_path).items() if k != "ood"}), console=False,
                      track=False)
    assert plain.fingerprint != res.fingerprint
    assert plain.flat_metrics()["loss/auc"] == pytest.approx(m["loss/auc"], abs=1e-6)


def _colours(png) -> set[str]:
    """The colours of a PNG's pixels, as #RRGGBB."""
    import matplotlib.image as mpimg

    rgb = np.round(mpimg.imread(png)[..., :3] * 255).astype(int).reshape(-1, 3)
    return {"#" + "".join(f"{v:02X}" for v in c) for c in np.unique(rgb, axis=0)}


def test_ood_objectives_and_bad_sets(tmp_path):
    from raymia.metric_names import check_metric_names

    d = _spec(tmp_path)
    d["sweep"] = {"defense": "label_smoothing", "objectives": [{"metric": "ood/loss/fpr", "mode": "max"},
                                                               {"metric": "ood/entropy/noise/auroc", "mode": "min"}]}
    spec = validate_spec(d, SweepSpec)
    check_metric_names(spec, [o.metric for o in spec.sweep.objectives], "sweep.objectives")
    with pytest.raises(SpecError, match="ood/ATTACK/fpr"):
        check_metric_names(spec, ["ood/lira_online/fpr"], "sweep.objectives")  # online attacks are not evaluated
    with pytest.raises(SpecError) as e:
        validate_spec(_spec(tmp_path, ood={"sets": [{"name": "gaussian", "params": {"sigma": -1}}]}))
    assert e.value.where.startswith("ood.sets.0.params")
    with pytest.raises(SpecError) as e:
        validate_spec(_spec(tmp_path, ood={"sets": ["scaled", "scaled"]}))
    assert "label" in str(e.value)


def test_ood_figure_gives_rates_in_percent_as_the_table_does():
    """The figure's axis read 0.0 to 1.0 under "points flagged as members" (a count?) beside a table of
    percents; it is the share of each set flagged, in percent."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from raymia.ood_audit import OodResult
    from raymia.report.plots import draw_ood

    sets = ["held_out", "scaled", "noise"]
    ood = OodResult(sets=sets, label_sources={"held_out": "true", "scaled": "source", "noise": "random"},
                    attacks={"loss": {s: {"fpr": f} for s, f in zip(sets, (0.72, 0.96, 0.0), strict=True)}},
                    attacks_std={"loss": {s: {"fpr": 0.02} for s in sets}}, recall={"loss": 0.945})
    fig = Figure()
    FigureCanvasAgg(fig)
    draw_ood(ood, fig)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert ax.get_ylabel().startswith("share of the set flagged as members (FPR)")
    assert {"0%", "40%", "80%"} <= {t.get_text() for t in ax.get_yticklabels()}
    from matplotlib.container import BarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [round(b.get_height(), 2) for b in bars] == [0.72, 0.96, 0.0]
