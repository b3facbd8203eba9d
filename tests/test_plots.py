"""Report figures: Pareto-front selection (raymia.pareto) and that the plots write real, non-blank PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from raymia.pareto import pareto_front
from raymia.report.plots import plot_pareto, plot_roc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png_not_blank(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert len(colours) > 1


# --- pareto_front ----------------------------------------------------------------------------------------
POINTS = [
    {"acc": 0.90, "tpr": 0.10},  # 0: front (best accuracy)
    {"acc": 0.80, "tpr": 0.05},  # 1: front
    {"acc": 0.80, "tpr": 0.06},  # 2: dominated by 1 (same acc, worse tpr)
    {"acc": 0.70, "tpr": 0.01},  # 3: front (lowest tpr)
    {"acc": 0.60, "tpr": 0.02},  # 4: dominated by 3
    {"acc": 0.80, "tpr": 0.05},  # 5: exact duplicate of 1: duplicates don't dominate each other, kept
    {"acc": 0.95, "tpr": None},  # 6: missing objective: excluded although it would dominate 0
    {"acc": float("nan"), "tpr": 0.0},  # 7: NaN objective: excluded
    {"tpr": 0.0},  # 8: absent key: excluded
    {"acc": 0.90, "tpr": 0.10},  # 9: duplicate of 0: kept
]


def test_pareto_front_max_min() -> None:
    assert pareto_front(POINTS, [("acc", "max"), ("tpr", "min")]) == [0, 1, 3, 5, 9]


def test_pareto_front_orientation_matters() -> None:
    # Maximising both: the highest-accuracy/highest-tpr points win.
    assert pareto_front(POINTS, [("acc", "max"), ("tpr", "max")]) == [0, 9]
    # Minimising both: 3 (lowest tpr) and 4 (lowest acc) trade off; the rest are dominated by 3.
    assert pareto_front(POINTS, [("acc", "min"), ("tpr", "min")]) == [3, 4]


def test_pareto_front_single_objective_ties_all_kept() -> None:
    pts = [{"a": 1.0}, {"a": 3.0}, {"a": 3.0}, {"a": 2.0}]
    assert pareto_front(pts, [("a", "max")]) == [1, 2]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([], [("a", "max")]) == []
    assert pareto_front([{"a": None}, {"a": math.nan}], [("a", "max")]) == []
    with pytest.raises(ValueError):
        pareto_front([{"a": 1}], [("a", "up")])
    with pytest.raises(ValueError):
        pareto_front([{"a": 1}], [])


# --- figures ---------------------------------------------------------------------------------------------
def test_plot_roc_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fpr = np.concatenate([[0.0], np.sort(rng.uniform(1e-4, 1, 200)), [1.0]])
    curves = {"lira": (fpr, np.sqrt(fpr)), "loss": (fpr, fpr**0.8)}
    out = plot_roc(curves, tmp_path / "sub" / "roc.png", title="ROC")
    assert out == tmp_path / "sub" / "roc.png"
    _assert_png_not_blank(out)


def test_roc_title_names_the_setting_the_bank_and_the_target() -> None:
    import raymia
    from raymia.audit import roc_title

    plain = raymia.as_spec({"name": "q", "plan": {"num_models": 8}})
    assert roc_title(plain, 3) == "q: no defense, 8 models; target 3"
    hamp = raymia.as_spec({"name": "q", "defense": {"name": "hamp", "params": {"gamma": 0.67891, "alpha": 1e-3}}})
    assert roc_title(hamp, 0).startswith("q: hamp (gamma=0.6789, alpha=0.001")


def test_a_curves_label_is_its_own_auc() -> None:
    """The legend named the mean AUC over targets beside the first target's curve (0.718 beside a 0.759
    curve); each curve is now labelled with the AUC of the scores it was drawn from, ties counted half."""
    from sklearn.metrics import roc_auc_score

    from raymia.metrics import roc
    from raymia.report.plots import curve_auc

    rng = np.random.default_rng(0)
    member = rng.random(300) < 0.5
    for scores in (rng.normal(size=300) + member, np.round(rng.normal(size=300) + member, 1)):
        fpr, tpr, _ = roc(scores, member)
        assert curve_auc(fpr, tpr) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)


def test_plot_pareto_writes_png(tmp_path: Path) -> None:
    pts = [dict(p, defense="hamp" if i % 2 else "dpsgd") for i, p in enumerate(POINTS)]
    front = set(pareto_front(pts, [("acc", "max"), ("tpr", "min")]))
    out = plot_pareto(
        pts,
        "acc",
        "tpr",
        tmp_path / "pareto.png",
        front_ids=front,
        x_label="test accuracy",
        y_label="TPR@0.1%FPR",
        title="privacy vs utility",
        reference={"acc": 0.93, "tpr": 0.3},
    )
    _assert_png_not_blank(out)


def test_front_labels_cover_no_other_label_or_marker() -> None:
    """Front points a few points apart on the page (the quickstart's front: trials 1, 4 and 5 within 25
    points) each get a number that covers no other number and no marker; an isolated point keeps the
    usual place, upper right."""
    from raymia.report.plots import _RING_RADIUS, _box_meets_disc, _boxes_meet, place_labels

    anchors = [(100.0, 100.0), (112.0, 104.0), (118.0, 110.0), (300.0, 50.0)]
    texts = ["1", "4", "15", "7"]
    dots = anchors + [(112.0, 96.0), (160.0, 90.0)]
    offsets = place_labels(anchors, texts, dots)
    boxes = [(x + dx, y + dy, x + dx + 0.62 * 8 * len(t), y + dy + 8)
             for (x, y), (dx, dy), t in zip(anchors, offsets, texts, strict=True)]
    for i, box in enumerate(boxes):
        assert not any(_box_meets_disc(box, x, y, _RING_RADIUS) for x, y in dots), (texts[i], offsets[i])
        assert not any(_boxes_meet(box, other) for j, other in enumerate(boxes) if j != i), texts[i]
    assert offsets[3] == (5.0, 4.0)  # nothing near: upper right
    assert offsets[0] != offsets[1] or offsets[1] != offsets[2]
    # near the axes' right edge a long label goes to the left, inside the frame
    (dx, dy), = place_labels([(300.0, 50.0)], ["digits-hamp:2"], [(300.0, 50.0)], bounds=(0, 0, 310, 200))
    assert dx < 0 and 300 + dx + 0.62 * 8 * len("digits-hamp:2") <= 310 and 0 <= 50 + dy


def test_trials_at_the_same_point_share_one_front_label() -> None:
    """A setting the sampler proposed again lands on the same point: one label, "5, 7, 8", not three
    numbers stacked on one marker."""
    from raymia.report.plots import _merged_labels

    front = [(0.0194, 0.9103, "5"), (0.0269, 0.9108, "12"), (0.0194, 0.9103, "7"), (0.0194, 0.9103, "8")]
    assert _merged_labels(front) == [(0.0194, 0.9103, "5, 7, 8"), (0.0269, 0.9108, "12")]


KEEPS_BACKEND = """
import matplotlib
matplotlib.use("svg")  # the caller's backend: a notebook's inline one, a desktop's Qt
import numpy as np
from raymia.report.plots import plot_pareto, plot_roc
plot_roc({"loss": (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.7, 1.0]))}, "roc.png", title="t")
plot_pareto([{"trial": 1, "a": 0.9, "b": 0.1}, {"trial": 2, "a": 0.8, "b": 0.05}], "a", "b", "pareto.png", {0})
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""


def test_drawing_a_report_leaves_the_callers_matplotlib_backend(tmp_path):
    """An audit draws its figures without pyplot: a notebook's backend stays its own (it was switched to Agg
    when the report's module was imported, and the notebook's plt.show() then showed nothing)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KEEPS_BACKEND], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "0"]
    assert mpimg.imread(tmp_path / "roc.png").shape[2] == 4 and (tmp_path / "pareto.png").stat().st_size > 0


def test_interactive_front_says_which_way_is_better_and_stars_the_undefended_trial(tmp_path: Path) -> None:
    """pareto.html titled its axes "test_accuracy (max)" (the maximum accuracy?) and drew the undefended
    trial as one more dot of a defense named "none"; pareto.png says "higher is better" and stars it."""
    from raymia.pareto import front_and_hypervolume
    from raymia.report.interactive import pareto_html

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    rows = [("none", {}, 0.9367, 0.1137), ("hamp", {"gamma": 0.68}, 0.9528, 0.0125),
            ("hamp", {"gamma": 0.59}, 0.9542, 0.2706), ("hamp", {"gamma": 0.84}, 0.9544, 0.0163)]
    trials = [{"trial": i, "defense": d, "params": p, "status": "ok", "test_accuracy": acc,
               "lira_online/tpr_fpr_0.01": tpr} for i, (d, p, acc, tpr) in enumerate(rows)]
    front, _, _ = front_and_hypervolume(trials, objectives)
    page = pareto_html(trials, objectives, front, tmp_path / "pareto.html").read_text().replace(" ", "")
    assert '"text":"test_accuracy(higherisbetter)"' in page
    assert '"text":"lira_online\\u002ftpr_fpr_0.01(lowerisbetter),logscale"' in page  # plotly writes / so
    assert '"name":"undefended(trial0)"' in page and '"symbol":"star"' in page
    assert '"name":"none"' not in page and '"name":"hamp"' in page


def test_histograms_spread_heavy_tailed_scores_on_a_signed_log_scale() -> None:
    """LiRA's scores of points no shadow fits reach -800 beside a bulk within +-10 (the quickstart's trial
    2): binned linearly over the central 99%, members and non-members shared one or two of the 40 bins. A
    signed log scale, ticked in score units, spreads them; scores without such tails keep a linear axis."""
    from matplotlib.figure import Figure

    from raymia.report.plots import draw_histograms
    from raymia.report.records import PointScores

    rng = np.random.default_rng(0)
    member = np.zeros((2, 400), dtype=bool)
    member[0, :200] = member[1, 200:] = True
    tail = -np.exp(rng.uniform(np.log(20), np.log(800), (2, 400)))  # a fifth of the non-members far off
    lira = np.where(member, rng.normal(2.0, 4.0, (2, 400)),
                    np.where(rng.random((2, 400)) < 0.2, tail, rng.normal(-1.0, 3.0, (2, 400))))
    points = PointScores(index=np.arange(400), label=np.zeros(400, dtype=int), member=member,
                         scores={"lira_online": lira, "rmia_online": rng.random((2, 400)) + 0.2 * member},
                         targets=[0, 1])
    fig = Figure()
    draw_histograms(points, fig)
    lira_ax, rmia_ax = fig.axes[:2]
    assert lira_ax.get_xlabel() == "score, signed log scale (higher: more likely a member)"
    assert {"-100", "-10", "0", "1", "10"} <= {t.get_text() for t in lira_ax.get_xticklabels()}
    non_members, members = lira_ax.patches[:2]  # the two histograms, each one filled outline
    # the outline's top holds two corners per bin at its height: the members' bulk over 10 of the 40 bins
    assert np.count_nonzero(members.get_xy()[:, 1] > 0) >= 2 * 10
    assert rmia_ax.get_xlabel() == "score (higher: more likely a member)"


def test_roc_legend_is_beside_the_curves_not_on_them(tmp_path: Path) -> None:
    """A defended audit with raw/ curves and label_only has a dozen legend entries: in the lower right
    corner they covered the curves near the chance line. The legend sits beside the axes, and the saved
    PNG keeps it whole; the axes stay log-log with the chance diagonal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from raymia.report.plots import draw_roc

    rng = np.random.default_rng(0)
    fpr = np.concatenate([[0.0], np.sort(rng.uniform(1e-3, 1, 200)), [1.0]])
    names = ["loss", "lira_online", "lira_offline", "rmia_online", "label_only"]
    curves = {f"{raw}{a}": (fpr, fpr ** (0.4 + 0.1 * i + 0.5 * bool(raw)))
              for raw in ("", "raw/") for i, a in enumerate(names)}
    fig = Figure(figsize=(5.5, 5.0))
    FigureCanvasAgg(fig)
    draw_roc(curves, fig, "hamp (gamma=0.9), 8 models; target 0")
    (ax,) = fig.axes
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert "chance" in [line.get_label() for line in ax.get_lines()]
    renderer = fig.canvas.get_renderer()
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert len(ax.get_legend().get_texts()) == 12 and legend.x0 > frame.x1
    out = plot_roc(curves, tmp_path / "roc.png")
    height, width = mpimg.imread(out).shape[:2]
    assert width > 1.3 * height  # the legend's column beside the square plot, not cut off at 5.5 in


def test_importance_panels_each_take_the_pages_width(tmp_path: Path) -> None:
    """Side by side, the second objective's parameter names (hamp.output_modification) reached into the
    first panel, over its longer bars: the panels are stacked, each as wide as the page, and the left
    margin holds the longest name."""
    import optuna

    from raymia.report.interactive import importance_html

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        gamma = trial.suggest_float("hamp.gamma", 0.3, 0.99)
        modify = trial.suggest_categorical("hamp.output_modification", [True, False])
        return 0.9 + 0.05 * gamma, 0.3 - 0.28 * modify + 0.01 * gamma

    study.optimize(objective, n_trials=8)
    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    page = importance_html(storage, "s", objectives, tmp_path / "importance.html").read_text().replace(" ", "")
    assert '"xaxis":{"anchor":"y","domain":[0.0,1.0]' in page and '"xaxis2":{"anchor":"y2","domain":[0.0,1.0]' in page
    assert f'"margin":{{"l":{40 + 7 * len("hamp.output_modification")}}}' in page
    assert "(8trials:aroughguide)" in page
