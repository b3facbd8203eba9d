"""Figures for reports: log-log ROC curves and privacy/utility Pareto fronts, written as PNG files.

Drawing only: which trials are on a front is `raymia.pareto`'s to decide (`plot_pareto` rings the ones
it is given). Figures are matplotlib `Figure` objects drawn without pyplot: no backend is selected, so the
caller's (a notebook's inline backend) stays its own, and PNGs render on headless workers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raymia.metrics import as_number

_DPI = 150
_MIN_FPR = 1e-5

# Okabe and Ito's colours (without their yellow, faint on white, and black, the front's rings), then Tol's
# wine and a grey: told apart under the common colour-vision deficiencies, where tab10's green and red are not
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#882255", "#777777")


def attack_colours(names: Iterable[str]) -> dict[str, str]:
    """Each attack's colour, by its place among `names` (the audit's attacks, in the spec's order), so that an
    attack has one colour on every figure of a report; "raw/<attack>" takes its attack's."""
    released = list(dict.fromkeys(n.removeprefix("raw/") for n in names))
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(released)}


def _value(point: Mapping[str, Any], key: str) -> float | None:
    """The point's numeric value for key, or None when missing, None, non-numeric or NaN."""
    return as_number(point.get(key))


def _axis_floor(curves: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Lower log-axis limit: the smallest positive rate over all curves (about 1/n), clipped to >= 1e-5
    and rounded down to a power of ten; 1e-5 when no curve has a positive rate."""
    smallest = math.inf
    for fpr, tpr in curves:
        for arr in (np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)):
            pos = arr[np.isfinite(arr) & (arr > 0)]
            if pos.size:
                smallest = min(smallest, float(pos.min()))
    if not math.isfinite(smallest):
        return _MIN_FPR
    lo = max(_MIN_FPR, min(smallest, 0.1))
    return 10.0 ** math.floor(math.log10(lo) + 1e-12)


def curve_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The area under a ROC curve given with every threshold's point (`metrics.roc`): the AUC of the scores
    it was drawn from, ties counted half."""
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """roc.png (`draw_roc`), cropped to what is drawn, the legend beside the axes included. Returns the
    PNG path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.5, 5.0))
    try:
        draw_roc(curves, fig, title)
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return path


def draw_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], fig: Figure, title: str | None = None) -> None:
    """Log-log ROC curves (fpr, tpr) per attack on `fig` with the chance diagonal, each labelled with its
    own AUC; the low-FPR region is where membership inference matters. Zero rates are drawn at the axis
    floor, and FPRs below the smallest one the curves resolve (one non-member) are shaded: a flat stretch
    there is the floor, not a measurement. A curve named "raw/<attack>" (the attack before the defense's
    post-processing) is drawn dashed in its attack's colour. The legend is beside the axes, not on them:
    with raw/ curves and label_only a dozen entries would cover the curves."""
    lo = _axis_floor(curves.values())
    fprs = [np.asarray(f, dtype=float) for f, _ in curves.values()]
    resolved = min((float(f[f > 0].min()) for f in fprs if (f > 0).any()), default=lo)
    ax = fig.subplots()
    if resolved > lo:
        ax.axvspan(lo, resolved, color="0.92", zorder=0, label="below one non-member")
    colours = attack_colours(curves)
    for name, (fpr, tpr) in curves.items():
        x = np.clip(np.asarray(fpr, dtype=float), lo, 1.0)
        y = np.clip(np.asarray(tpr, dtype=float), lo, 1.0)
        label = f"{name} (AUC={curve_auc(fpr, tpr):.3f})"
        raw = name.startswith("raw/")
        ax.plot(x, y, label=label, linewidth=1.2 if raw else 1.5, linestyle="--" if raw else "-",
                color=colours[name.removeprefix("raw/")])
    ax.plot([lo, 1.0], [lo, 1.0], linestyle="--", color="grey", linewidth=1.0, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    lines = textwrap.wrap(title or "", 55)
    if lines:
        ax.set_title("\n".join(lines), fontsize=11)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    # Fixed margins (the tick labels are powers of ten, the size is fixed): tight_layout would measure
    # every log tick label, half of the figure's time, paid by each audit of a sweep.
    fig.subplots_adjust(left=0.14, right=0.955, bottom=0.115, top=0.97 - 0.042 * len(lines))


def plot_pareto(
    points: list[dict],
    x_key: str,
    y_key: str,
    path: str | Path,
    front_ids: set,
    group_key: str = "defense",
    x_label: str | None = None,
    y_label: str | None = None,
    title: str | None = None,
    reference: dict | None = None,
    x_err_key: str | None = None,
    y_err_key: str | None = None,
    label_key: str | None = "trial",
    lines: dict[str, float] | None = None,
    front_step: str = "post",
) -> Path:
    """Scatter of every trial (one colour and marker per group, e.g. defense) with the non-dominated trials
    ringed, joined by a step line and labelled with their `label_key` (the trial number), plus the
    undefended reference point as a star (and not again as a dot of its group) and a dashed line at each
    value of `lines` ({x_key or y_key: value}: a hypervolume reference given by hand). `front_step`: the
    staircase's `where` ("post" when x is minimised, "pre" when maximised).

    front_ids holds indices into points: the front as the caller computed it (`raymia.pareto`), drawn as
    given. Points missing x_key or y_key are skipped. x_err_key / y_err_key name each point's spread (e.g.
    the std over targets), drawn as error bars where present. An axis whose positive values span more than
    a factor of 20 (leakage rates) is logarithmic. The legend sits outside the data. Returns the PNG path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[float, float, float, float]]] = {}
    front: list[tuple[float, float, str]] = []
    xs, ys = [], []
    for i, p in enumerate(points):
        x, y = _value(p, x_key), _value(p, y_key)
        if x is None or y is None:
            continue
        xs.append(x)
        ys.append(y)
        if i in front_ids:
            front.append((x, y, str(p.get(label_key, "")) if label_key else ""))
        if reference is not None and p is reference.get("point"):
            continue  # drawn as the star
        groups.setdefault(str(p.get(group_key, "?")), []).append(
            (x, y, _spread(p, x_err_key), _spread(p, y_err_key)))

    markers = "os^Dv<>PXh"
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    try:
        for k, (group, xy) in enumerate(groups.items()):
            colour, marker = PALETTE[k % len(PALETTE)], markers[(k // len(PALETTE) + k) % len(markers)]
            arr = np.asarray(xy, dtype=float)
            if arr[:, 2:].any():
                ax.errorbar(arr[:, 0], arr[:, 1], xerr=arr[:, 2], yerr=arr[:, 3], fmt="none",
                            ecolor=colour, alpha=0.35, linewidth=0.9)
            ax.scatter(arr[:, 0], arr[:, 1], s=26, alpha=0.8, color=colour, marker=marker, label=group)
        if front:
            arr = np.asarray(sorted((x, y) for x, y, _ in front), dtype=float)
            ax.step(arr[:, 0], arr[:, 1], where=front_step, color="black", linewidth=1.2, alpha=0.8)
            ax.scatter(arr[:, 0], arr[:, 1], s=80, facecolors="none", edgecolors="black", linewidths=1.4,
                       label="Pareto front", zorder=3)
        if reference is not None:
            _draw_reference(ax, reference, x_key, y_key, x_err_key, y_err_key)
        for key, value in (lines or {}).items():
            draw = ax.axvline if key == x_key else ax.axhline
            draw(value, color="grey", linestyle="--", linewidth=1.0, label=f"hypervolume reference: {key} {value:g}")
        for values, set_scale in ((xs, ax.set_xscale), (ys, ax.set_yscale)):
            pos = [v for v in values if v > 0]
            if pos and len(pos) == len(values) and max(pos) / min(pos) > 20:
                set_scale("log")
        ax.set_xlabel(x_label or x_key)
        ax.set_ylabel(y_label or y_key)
        if title:
            ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        if front:  # after the layout, which moves the points on the page
            _label_front(ax, _merged_labels(front), list(zip(xs, ys, strict=True)))
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return path


def _merged_labels(front: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per point: trials at the same place (a setting the sampler proposed again) as "5, 7, 8"."""
    at: dict[tuple[float, float], list[str]] = {}
    for x, y, text in front:
        at.setdefault((x, y), []).append(text)
    return [(x, y, ", ".join(texts)) for (x, y), texts in at.items()]


_LABEL_SIZE = 8  # points
_RING_RADIUS = 6.0  # points: the front's rings (s=80) and a margin; the other dots are smaller


def place_labels(anchors: list[tuple[float, float]], texts: list[str], obstacles: list[tuple[float, float]],
                 fontsize: float = _LABEL_SIZE,
                 bounds: tuple[float, float, float, float] | None = None) -> list[tuple[float, float]]:
    """Offsets (points) of each text's lower-left corner from its anchor (points on the page), chosen
    greedily among places around the anchor so that no label covers another label or any marker
    (`obstacles`, the anchors among them) or crosses `bounds` (x0, y0, x1, y1: the axes, whose frame
    would cut through a long label such as "sweep:12"): front points that sit close together each keep a
    readable number. Where every place is taken, the first one (upper right) is used."""
    placed: list[tuple[float, float, float, float]] = []
    offsets = []
    for (px, py), text in zip(anchors, texts, strict=True):
        w, h = 0.62 * fontsize * max(len(text), 1), float(fontsize)
        candidates = []  # upper right first (the usual place), then around the anchor, then farther out
        for gap in (5.0, 10.0, 18.0):
            candidates += [(gap, gap - 1), (gap, 1 - gap - h), (-gap - w, gap - 1), (-gap - w, 1 - gap - h),
                           (-w / 2, gap + 2), (-w / 2, -gap - 2 - h), (gap + 2, -h / 2), (-gap - 2 - w, -h / 2)]
        choice = candidates[0]
        for dx, dy in candidates:
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            if bounds is not None and not (bounds[0] <= box[0] and box[2] <= bounds[2]
                                           and bounds[1] <= box[1] and box[3] <= bounds[3]):
                continue
            if not any(_boxes_meet(box, b) for b in placed) and not any(
                    _box_meets_disc(box, ox, oy, _RING_RADIUS) for ox, oy in obstacles):
                choice = (dx, dy)
                break
        offsets.append(choice)
        placed.append((px + choice[0], py + choice[1], px + choice[0] + w, py + choice[1] + h))
    return offsets


def _boxes_meet(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _box_meets_disc(box: tuple[float, ...], x: float, y: float, r: float) -> bool:
    nx, ny = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
    return (nx - x) ** 2 + (ny - y) ** 2 < r * r


def _label_front(ax, front: list[tuple[float, float, str]], dots: list[tuple[float, float]]) -> None:
    """Each front point's label (its trial number) where it covers no other label or marker."""
    scale = 72.0 / ax.figure.dpi  # display pixels -> points

    def page(x: float, y: float) -> tuple[float, float]:
        px, py = ax.transData.transform((x, y))
        return px * scale, py * scale

    labelled = [(x, y, t) for x, y, t in front if t]
    anchors = [page(x, y) for x, y, _ in labelled]
    frame = tuple(v * scale for v in ax.bbox.extents)
    offsets = place_labels(anchors, [t for *_, t in labelled], [page(x, y) for x, y in dots], bounds=frame)
    for (x, y, text), off in zip(labelled, offsets, strict=True):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=off, ha="left", va="bottom",
                    fontsize=_LABEL_SIZE, zorder=5)


def _spread(p: dict, key: str | None) -> float:
    """A point's spread under `key` (0 where it has none)."""
    v = _value(p, key) if key else None
    return v if v is not None and math.isfinite(v) else 0.0


def _draw_reference(ax, reference: dict, x_key: str, y_key: str, x_err_key: str | None,
                    y_err_key: str | None) -> None:
    """The undefended point as a red star, with its own spread as error bars."""
    rx, ry = _value(reference, x_key), _value(reference, y_key)
    if rx is None or ry is None:
        return
    rxe, rye = _spread(reference, x_err_key), _spread(reference, y_err_key)
    if rxe or rye:
        ax.errorbar([rx], [ry], xerr=[rxe], yerr=[rye], fmt="none", ecolor="red", alpha=0.5, linewidth=0.9)
    ax.scatter([rx], [ry], marker="*", s=220, color="red", edgecolors="black", linewidths=0.8,
               label=str(reference.get("label", "undefended")), zorder=4)


def plot_shadow_curve(curve: Any, metric: str, path: str | Path) -> Path:
    """An attack's `metric` against the number of shadow models (`shadows.ShadowCurve`): a line per attack
    through the means over the targets, its std as a band, the x axis in powers of two. Returns the PNG path."""
    from matplotlib.ticker import FixedLocator, NullLocator

    from raymia.metrics import metric_label

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.0, 4.2))
    try:
        ax = fig.subplots()
        x = np.asarray(curve.shadows, dtype=float)
        colours = attack_colours(curve.attacks)
        for a in curve.attacks:
            mean, std = curve.mean(a, metric), curve.std(a, metric)
            ax.plot(x, mean, marker="o", markersize=3.5, linewidth=1.5, color=colours[a], label=a)
            ax.fill_between(x, mean - std, mean + std, color=colours[a], alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(x))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(v)) for v in x])
        ax.set_xlabel("shadow models per target")
        ax.set_ylabel(f"{metric_label(metric)} (mean over {len(curve.targets)} target(s), band: std)")
        ax.grid(True, alpha=0.4)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    finally:
        fig.clear()
    return path


def plot_ood(ood: Any, path: Path, title: str = "false positives by non-member set",
             colours: Mapping[str, str] | None = None) -> Path:
    """ood_fpr.png (`draw_ood`). Returns the PNG path."""
    fig = Figure(figsize=(min(12.0, 3.0 + 0.9 * len(ood.sets)), 4.2))
    try:
        draw_ood(ood, fig, title, colours)
        fig.savefig(path, dpi=_DPI)
    finally:
        fig.clear()
    return Path(path)


def draw_ood(ood: Any, fig: Figure, title: str = "false positives by non-member set",
             colours: Mapping[str, str] | None = None) -> None:
    """Grouped bars on `fig`: per non-member set (held-out data first), each attack's FPR at its
    shadow-calibrated threshold, with the std over targets as error bars; the attack's recall on members as
    a dashed line; rates in percent, as the page's table gives them. `colours`: each attack's
    (`attack_colours` of the audit's attacks, as roc.png draws them; by default of the attacks drawn here)."""
    from matplotlib.ticker import PercentFormatter

    sets, attacks = list(ood.sets), list(ood.attacks)
    colours = colours or attack_colours(attacks)
    ax = fig.subplots()
    width = 0.8 / max(1, len(attacks))
    x = np.arange(len(sets))
    for i, a in enumerate(attacks):
        vals = [as_number(ood.attacks[a][s]["fpr"]) or 0.0 for s in sets]
        errs = [as_number(ood.attacks_std[a][s]["fpr"]) or 0.0 for s in sets]
        ax.bar(x + (i - (len(attacks) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=a,
               color=colours[a])
        ax.axhline(ood.recall[a], color=colours[a], linestyle="--", linewidth=0.8)
    ax.set_xticks(x, sets, rotation=20, ha="right")
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("share of the set flagged as members (FPR)\n(threshold: max TPR - FPR on a shadow)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left", title="attack (dashed: recall)",
              title_fontsize=8)
    fig.tight_layout()


HISTOGRAMS_FILE = "histograms.png"
SHADOWS_PNG, SHADOWS_CSV = "shadows.png", "shadows.csv"  # beside an audit's report (`raymia shadows`)


def histograms_title(name: str) -> str:
    return f"{name}: scores of members and non-members"


def plot_histograms(points, path: str | Path, title: str | None = None, bins: int = 40) -> Path:
    """histograms.png (`draw_histograms`). `points` is a `report.records.PointScores`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = min(3, len(points.scores))
    fig = Figure(figsize=(4.2 * cols, 3.0 * math.ceil(len(points.scores) / cols)))
    try:
        draw_histograms(points, fig, title, bins)
        fig.savefig(path, dpi=_DPI)
    finally:
        fig.clear()
    return path


# the central 99% of the scores wider than this many interquartile ranges: a signed log scale
_HEAVY_TAIL = 20.0


def _signed_log(x, scale: float):
    """sign(x) log10(1 + |x| / scale): linear within about +-scale, logarithmic beyond, order kept."""
    return np.sign(x) * np.log10(1 + np.abs(x) / scale)


def draw_histograms(points, fig: Figure, title: str | None = None, bins: int = 40) -> None:
    """One panel per attack on `fig`: the scores of members and of non-members (every target pooled), with
    the first target's flag threshold (`report.records.flag_thresholds`). The bins span the central 99% of
    the scores, so a few extreme scores do not squeeze the rest into one bin; where most scores crowd at
    the top (losses near 0) the axis is the distance to the top on a log scale, and where the central 99%
    is still many interquartile ranges wide (LiRA's log-likelihood ratios, down to -1000 for points no
    shadow fits, about a bulk within +-10) a signed log scale with ticks in score units."""
    from raymia.report.records import FLAG_FPR, flag_thresholds

    names = list(points.scores)
    cols = min(3, len(names))
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False)
    member = points.member
    for ax, name in zip(axes.flat, names):
        s = points.scores[name]
        threshold = flag_thresholds(s[:1], member[:1])[0]
        xlabel = "score (higher: more likely a member)"
        finite = s[np.isfinite(s)]
        gap = finite.max() - finite if finite.size else finite
        lo, q1, q3, hi = np.quantile(finite, [0.005, 0.25, 0.75, 0.995]) if finite.size else (0.0, 0.0, 0.0, 1.0)
        ticks = None
        if gap.size and (gap > 0).any() and 100 * np.quantile(gap, 0.5) < np.quantile(gap, 0.995):
            # most scores crowd at the top (losses near 0): the distance to the top on a log scale, drawn
            # so that right is still "more likely a member"
            top, floor = finite.max(), np.quantile(gap[gap > 0], 0.01) / 10
            s = -np.log10(np.maximum(top - s, 0) + floor)
            threshold = -np.log10(max(top - threshold, 0) + floor)
            xlabel = "-log10(top score - score) (right: more likely a member)"
        elif q3 > q1 and hi - lo > _HEAVY_TAIL * (q3 - q1):
            scale = 10.0 ** math.floor(math.log10(q3 - q1))  # the linear stretch around 0: the bulk's order
            marks = [0.0] + [v * scale * 10.0 ** k for k in range(12) for v in (-1, 1)]
            ticks = sorted(v for v in marks if lo <= v <= hi)
            s, threshold = _signed_log(s, scale), float(_signed_log(threshold, scale))
            xlabel = "score, signed log scale (higher: more likely a member)"
        finite = s[np.isfinite(s)]
        lo, hi = (np.quantile(finite, [0.005, 0.995]) if finite.size else (0.0, 1.0))
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for mask, label, colour in ((~member, "non-members", "tab:blue"), (member, "members", "tab:red")):
            # one filled outline per histogram, not a patch per bin: the same picture, a third less drawing time
            ax.hist(np.clip(s[mask], lo, hi), bins=edges, alpha=0.55, color=colour, label=label, density=True,
                    histtype="stepfilled")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"flag threshold ({FLAG_FPR:.0%} FPR on the first target)")
        if ticks:
            ax.set_xticks(_signed_log(np.asarray(ticks), scale), [f"{v:g}" for v in ticks])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("density (all targets' points)", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
