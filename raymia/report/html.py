"""report.html: one self-contained page per audit or sweep, built from the files of its folder.

`write_html(folder)` reads what the audit or sweep left there (result.json, spec.yaml, the PNG figures,
vulnerable.csv) and writes report.html beside them: tables, figures embedded as data URIs, the spec. It
needs nothing but the folder, so `raymia report DIR` rebuilds the page of any finished run, and the page
opens anywhere (no script, no network). An audit's page: utility, the attacks' metrics (mean ± std over
the targets, bootstrap intervals where asked), ROC curves, score histograms, the most vulnerable records,
the out-of-distribution and inversion results, the defense's report, the spec. A sweep's page: the Pareto
front with each objective's spread and intervals, pareto.png, every trial, the final audit, the spec.
A notebook shows the top of these pages (`audit_fragment`, `sweep_fragment`: a result's `_repr_html_`).
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any

from raymia.errors import RaymiaError
from raymia.report.text import first_of

REPORT_FILE = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
 color:#1d1d1f;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.88rem}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f6}td:first-child,th:first-child{text-align:left}
tr.front td{background:#fff7e0;font-weight:600}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem}
pre{background:#f6f8fa;padding:1rem;overflow-x:auto;font-size:.8rem}
.na{color:#999}.note{color:#555;font-size:.85rem;margin:.2rem 0}
"""


def write_html(folder: str | Path) -> Path:
    """Write report.html into an audit's or a sweep's folder (the one holding its result.json)."""
    folder = Path(folder)
    result_path = folder / "result.json"
    if not result_path.is_file():
        from raymia.errors import not_found

        said = not_found(folder, "folder") if not folder.exists() else "holds no result.json"
        raise RaymiaError(f"{said}; pass the folder of a finished audit "
                          "(<output_dir>/audits/NAME-FINGERPRINT) or sweep (<output_dir>/sweeps/NAME)",
                          where=str(folder))
    try:
        result = json.loads(result_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RaymiaError(f"is not a JSON result: {e}", where=str(result_path)) from None
    if not isinstance(result, dict):
        raise RaymiaError(f"holds a JSON {type(result).__name__}, not a result raymia wrote", where=str(result_path))
    sweep = "front" in result and "trials" in result
    try:
        if not sweep:
            _draw_histograms(result, folder)
        body = _sweep(result, folder) if sweep else _audit(result, folder)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # edited by hand, or another program's
        raise RaymiaError(f"is not a result raymia wrote ({type(e).__name__}: {e})", where=str(result_path)) from None
    title = f"raymia {'sweep' if 'front' in result else 'audit'} {result.get('name', '')}"
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
    out = folder / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------
# pieces


def _num(v: Any, pct: bool = False) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return "<span class='na'>n/a</span>"
    return f"{100 * v:.2f}%" if pct else f"{v:.4g}"


def _fixed(v: Any) -> str:
    """A number in [0, 1] (an AUC) with 4 decimals, so that a column's values line up (1.0000, 0.0356)."""
    return f"{v:.4f}" if _is_number(v) else _num(None)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _mean(v: Any, sd: Any, pct: bool = False) -> str:
    """`v` as `_num` shows it, but beside a std as the console prints a mean ± std: 4 decimals below 1 and
    at 0 (0.5400, not 0.54; 0.0000, not 0), else 4 significant digits with their trailing zeros, so that
    the std, given as many decimals as the mean shows, keeps its digits."""
    shown = _num(v, pct)
    if pct or not _is_number(sd) or "<" in shown or "e" in shown:
        return shown
    if v == 0 or 1e-3 <= abs(v) < 1:  # as the console prints a mean ± std: 0.0000 ± 0.0000
        return f"{v:.4f}"
    return f"{v:#.4g}".rstrip(".")


def _spread(v: Any, sd: Any, pct: bool = False) -> str:
    """" ± sd" with as many decimals as `v` shows (`_mean`: a std printed finer than its mean claims a
    precision the mean does not have); "" where there is no std."""
    if not _is_number(sd):
        return ""
    shown = _mean(v, sd, pct)
    if "<" in shown or "e" in shown:  # the mean is n/a, or in scientific notation
        return f" ± {_num(sd, pct)}"
    digits = shown.rstrip("%").partition(".")[2]
    decimals = len(digits) if digits.isdigit() else 0
    return f" ± {100 * sd:.{decimals}f}%" if pct else f" ± {sd:.{decimals}f}"


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
           caption: str | None = None) -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _spec(folder: Path) -> str:
    spec = folder / "spec.yaml"
    if not spec.is_file():
        return ""
    return f"<h2>Spec</h2><pre id='spec'>{escape(spec.read_text())}</pre>"



# ---------------------------------------------------------------------------------------------------------
# an audit


def _audit(r: dict[str, Any], folder: Path) -> str:
    from raymia.report.plots import SHADOWS_CSV, SHADOWS_PNG

    trial = _sweep_trial(folder)
    title = f"Audit {escape(str(r.get('name')))}"
    if trial is not None:
        title += f": trial {escape(str(trial[1]))} of <a href='{trial[0]}'>its sweep</a>"
    parts = [f"<h1>{title}</h1>", *_audit_summary(r, folder)]
    if r.get("attacks"):
        parts.append(_figure(folder / "histograms.png",
                             "scores of members and non-members per attack, with the 1%-FPR flag threshold"))

    vul = _read_vulnerable(folder / "vulnerable.csv")
    if vul:
        parts.append("<h2 id='vulnerable'>Most vulnerable records</h2>")
        parts.append("<p>Members of the target ranked by how many attacks flag them (score above the threshold "
                     "that 1% of the target's non-members exceed), then by the share of non-members scored "
                     "below them and by how many standard deviations above the non-members' mean they lie. "
                     "Every point's scores: records.parquet.</p>")
        parts.append(_table(["target", "index", "label", "flagged by", "attacks", "non-member percentile",
                             "σ above non-members", "strongest attack", "its score"],
                            [[escape(v["target"]), escape(v["index"]), escape(v["label"]), escape(v["flagged_by"]),
                              escape(v["attacks"].replace("+", ", ") or "-"), _num(float(v["percentile"]), True),
                              f"{float(v['z']):.2f}", escape(v["attack"]), f"{float(v['score']):#.6g}"]
                             for v in vul]))

    if (folder / SHADOWS_PNG).is_file():
        parts.append("<h2 id='shadows'>Shadow models</h2>")
        parts.append("<p>Each attack again with nested random subsets of every target's shadows (whole "
                     "complementary pairs), from the stored signals; the last point is the audit's own count. A "
                     f"curve still rising there says more shadows would find more leakage. {SHADOWS_CSV} holds "
                     "every metric; <code>raymia shadows</code> drew them.</p>")
        parts.append(_figure(folder / SHADOWS_PNG, "an attack's metric by shadow models per target: mean over the "
                                                   "targets, std as a band"))

    d = r.get("defense", {}).get("report") or {}
    if d:
        parts.append("<h2>Defense</h2>")
        parts.append(_table(["fact", "value"], [[escape(k), _num(v)] for k, v in d.items()],
                            caption="mean over the bank's models, and the defense's stated guarantee"))

    ood = r.get("ood")
    if ood:
        sets = ood.get("sets", [])
        rows = [[escape(a), _num(ood.get("recall", {}).get(a), True),
                 *[f"{_num(per.get(s, {}).get('fpr'), True)} / {_fixed(per.get(s, {}).get('auroc'))}" for s in sets]]
                for a, per in ood.get("attacks", {}).items()]
        sources = ood.get("label_sources", {})
        heads = [s if s == "held_out" or s not in sources else f"{s} ({sources[s]} labels)" for s in sets]
        parts.append("<h2>Out-of-distribution non-members</h2>")
        parts.append("<p>Each attack flags a point as a member when its score is above the threshold that "
                     "maximises TPR - FPR on a shadow model (the target's pair, as the paper calibrates it: not "
                     "a fixed FPR). Recall: the members flagged; each set: the share of its points flagged "
                     "(false positives), and how well the scores tell the set from the members (AUROC). Means "
                     "over the targets; the figure's bars show their std.</p>")
        parts.append(_table(["attack", "recall", *heads], rows,
                            caption="FPR at the attack's calibrated threshold / AUROC against the members"))
        parts.append(_figure(folder / "ood_fpr.png", "false positives by non-member set"))

    inv = r.get("inversion")
    if inv:
        parts.append("<h2>Model inversion</h2>")
        attacks = inv.get("attacks", {})
        strongest = inv.get("strongest", {}) if len(attacks) > 1 else {}

        def cell(a: str, k: str, text: str) -> str:  # every attack that ties the strongest is as strong
            best = attacks.get(strongest.get(k), {}).get(k)
            return f"<b>{text}</b>" if best is not None and attacks[a].get(k) == best else text

        rows = [[escape(a), cell(a, "top1", _num(ms.get("top1"), True)), cell(a, "top5", _num(ms.get("top5"), True)),
                 cell(a, "knn_dist", _num(ms.get("knn_dist"))), cell(a, "fid", _num(ms.get("fid")))]
                for a, ms in attacks.items()]
        parts.append(_table(["attack", "top-1", "top-5", "KNN dist", "FID (evaluator features)"], rows,
                            caption="bold: the strongest attack on each metric (mi/worst/...): the highest top-1 "
                                    "and top-5, the lowest KNN distance and FID" if strongest else None))
        for a in inv.get("attacks", {}):
            parts.append(_figure(folder / f"inversion-{a}.png", f"{a}: reconstructions per private class"))

    parts.append(_spec(folder))
    return "".join(parts)


def audit_fragment(r: dict[str, Any], folder: Path) -> str:
    """An audit's headline as a notebook shows it (`AuditResult._repr_html_`): the page's own summary, its
    utility and attack tables and ROC curves, under the audit's name, without the page's styles (a
    notebook's would change)."""
    return (f"<div><p><b>Audit {escape(str(r.get('name')))}</b> · report {escape(str(folder))}</p>"
            f"{''.join(_audit_summary(r, folder, 'h4'))}</div>")


def _audit_summary(r: dict[str, Any], folder: Path, h: str = "h2") -> list[str]:
    """The top of an audit's page, which a notebook shows too (`audit_fragment`): who was audited, the
    utility, the attacks' table (and before the defense's post-processing) and the ROC curves; `h` the
    sections' heading tag."""
    from raymia.metrics import metric_label, shown_as_percent, table_columns, unresolved_note

    spec = r.get("spec", {})
    targets = r.get("targets", [])
    own = r.get("target")
    who = (f"your model ({own['source']}: {own['members']} members among {own['points']} audited points), "
           f"{spec.get('plan', {}).get('num_models')} shadows" if own else
           f"{spec.get('plan', {}).get('num_models')} models, {len(targets)} targets ({first_of(targets)})")
    parts = [f"<p class='sub'>signals {escape(str(r.get('fingerprint')))} · defense "
             f"{escape(str(r.get('defense', {}).get('name')))} · {escape(who)} · data "
             f"{escape(str(spec.get('data', {}).get('name')))} · model {escape(str(spec.get('model', {}).get('name')))}"
             f" · raymia {escape(str(r.get('raymia_version')))}</p>"]
    ins, outs = r.get("members_per_target"), r.get("nonmembers_per_target")
    if ins and outs:
        def span(v: list[int]) -> str:
            return str(v[0]) if min(v) == max(v) else f"{min(v)}-{max(v)}"

        parts.append(f"<p class='sub'>each target: {span(ins)} members, {span(outs)} non-members (an FPR's "
                     f"smallest step is 1/{span(outs)})</p>")
    if gate := r.get("gate"):  # the spec's conditions: a CI's verdict, first
        from raymia.metric_names import gate_line

        failed = [g for g in gate if not g["passed"]]
        parts.append(f"<p><b>gate {'failed' if failed else 'passed'}</b>: "
                     + "; ".join(("" if g["passed"] else "<b>FAIL</b> ") + escape(gate_line(g)) for g in gate) + "</p>")

    u, us = r.get("utility", {}), r.get("utility_std_over_targets", {})
    many = len(targets) > 1
    parts.append(f"<{h}>Utility</{h}>")
    parts.append(_table(["metric", "value"], [
        [escape(k), (_mean(v, us[k], shown_as_percent(k)) + _spread(v, us[k], shown_as_percent(k))
                     if many and k in us else _num(v, shown_as_percent(k)))]
        for k, v in u.items()], caption="of the attacked model(s)" + (" (mean ± std over targets)" if many else "")))

    attacks, std = r.get("attacks", {}), r.get("attacks_std_over_targets", {})
    if attacks:
        keys, unresolved = table_columns(attacks)

        def rows(attacks: dict, std: dict) -> list[list[str]]:
            out = []
            for a, ms in attacks.items():
                cells = [escape(a)]
                for k in keys:
                    pct = shown_as_percent(k)
                    sd = std.get(a, {}).get(k)
                    if many and sd is not None:
                        cell = _mean(ms.get(k), sd, pct) + _spread(ms.get(k), sd, pct)
                    else:
                        cell = _num(ms.get(k), pct)
                    lo, hi = ms.get(f"{k}_ci_low"), ms.get(f"{k}_ci_high")
                    if lo is not None and hi is not None:  # as the console prints it: [0.4630, 0.5808]
                        cell += f" [{_num(lo, pct) if pct else _fixed(lo)}, {_num(hi, pct) if pct else _fixed(hi)}]"
                    cells.append(cell)
                out.append(cells)
            return out

        heads = ["attack", *[metric_label(k) for k in keys]]
        parts.append(f"<{h}>Membership inference</{h}>")
        parts.append(_table(heads, rows(attacks, std)))
        if unresolved:
            parts.append(f"<p class='note'>{escape(unresolved_note(unresolved))}</p>")
        raw = r.get("raw_attacks")
        if raw is not None and raw != attacks:
            parts.append("<h3 id='raw'>Before the defense's post-processing</h3>")
            parts.append(_table(heads, rows(raw, r.get("raw_attacks_std_over_targets") or {}), caption=(
                "the same models' outputs as they leave them (raw/): what the training alone leaves")))
        elif raw is not None:
            parts.append("<p class='note'>raw/: the defense post-processes no output here, so the raw outputs "
                         "are the released ones.</p>")
        parts.append(_figure(folder / "roc.png", "ROC curves (log-log), first target"))
    return parts



def _draw_histograms(result: dict[str, Any], folder: Path) -> None:
    """histograms.png from records.parquet where the audit did not draw it (a sweep's trials)."""
    from raymia.report.plots import HISTOGRAMS_FILE, histograms_title, plot_histograms
    from raymia.report.records import RECORDS_FILE, read_records

    if (folder / RECORDS_FILE).is_file() and not (folder / HISTOGRAMS_FILE).is_file():
        plot_histograms(read_records(folder / RECORDS_FILE), folder / HISTOGRAMS_FILE,
                        title=histograms_title(str(result.get("name"))))


def _trial_folder(t: dict[str, Any], sweep: Path) -> str | None:
    """Where a sweep trial's report is beside the sweep's page (a relative path), if it is there: the
    undefended trial's in baseline/, the others' in trials/<Tune's trial id>/."""
    tid = str(t.get("trial_id") or "")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", tid):  # an id from an edited result.json names no other folder
        return None
    rel = tid if tid == "baseline" else f"trials/{tid}"
    return rel if (sweep / rel / "result.json").is_file() else None


def _sweep_trial(folder: Path) -> tuple[str, Any] | None:
    """(the sweep's page relative to `folder`, the trial's number) when `folder` is a trial's report in a
    finished sweep's folder; None otherwise."""
    folder = folder.resolve()
    if folder.name == "baseline":
        up, sweep = "../report.html", folder.parent
    elif folder.parent.name == "trials":
        up, sweep = "../../report.html", folder.parent.parent
    else:
        return None
    try:
        trials = json.loads((sweep / "result.json").read_text()).get("trials", [])
        number = next(t["trial"] for t in trials if str(t.get("trial_id")) == folder.name)
    except (OSError, ValueError, AttributeError, TypeError, KeyError, StopIteration):
        return None
    return up, number


def _read_vulnerable(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# a sweep


# the files beside a sweep's page that it links: (name, what it is)
SWEEP_FILES = (("pareto.html", "interactive front"), ("importance.html", "hyperparameter importance"),
               ("front.md", "every trial as Markdown"), ("spec.yaml", "the spec"))


def sweep_fragment(r: dict[str, Any], folder: Path) -> str:
    """A sweep's headline as a notebook shows it (`SweepResult._repr_html_`): the page's summary line, its
    Pareto front table and pareto.png, under the sweep's name, without the page's styles."""
    return (f"<div><p><b>Sweep {escape(str(r.get('name')))}</b> · report {escape(str(folder))}</p>"
            f"{_sweep_sub(r)}{''.join(_sweep_front(r, folder, 'h4'))}</div>")


def _sweep_sub(r: dict[str, Any]) -> str:
    from raymia.pareto import hypervolume_text

    trials = r.get("trials", [])
    ok = [t for t in trials if t.get("status") == "ok"]
    hv = r.get("hypervolume")
    return (f"<p class='sub'>{len(trials)} trials, {len(ok)} succeeded · front of {len(set(r.get('front', [])))} · "
            f"hypervolume {escape(hypervolume_text(hv, r.get('hypervolume_reference')))}</p>")


def _sweep_header(objectives: list[tuple[str, str | None]]) -> list[str]:
    return ["trial", "defense", "params", *[f"{m} ({mode})" if mode else m for m, mode in objectives]]


def _objective_cell(t: dict[str, Any], key: str) -> str:
    """A trial's objective as the console and front.md write it (fractions, 4 decimals: the sweep's tables
    name each objective by its metric key, in the units its hypervolume is measured in), with its interval."""
    from raymia.pareto import fmt_mean_std

    text = fmt_mean_std(t, key)
    if text == "n/a":
        return _num(None)
    lo, hi = t.get(f"{key}_ci_low"), t.get(f"{key}_ci_high")
    if isinstance(lo, int | float) and isinstance(hi, int | float):
        text += f" [{lo:.4f}, {hi:.4f}]"
    return escape(text)


def _sweep_front(r: dict[str, Any], folder: Path, h: str = "h2") -> list[str]:
    """The Pareto front's section of a sweep's page, which a notebook shows too (`sweep_fragment`): its
    table (a setting proposed again one row), a DP defense's epsilon note and pareto.png."""
    from raymia.pareto import epsilon_note, fmt_params, params_digits, same_settings, with_epsilon

    trials = r.get("trials", [])
    objectives = with_epsilon([(o["metric"], o["mode"]) for o in r.get("objectives", [])], trials)
    front = set(r.get("front", []))
    front_rows = same_settings([t for t in trials if t.get("trial") in front])  # a repeated setting: one row
    parts = [f"<{h} id='front'>Pareto front</{h}>",
             "<p>Each objective is the mean over the sweep's targets ± its std over them, with the bootstrap "
             "interval where the spec asks for one.</p>"]
    digits = params_digits(trials)  # enough to tell two settings apart
    parts.append(_table(_sweep_header(objectives),
                        [[escape(", ".join(str(r["trial"]) for r in g)), escape(str(g[0]["defense"])),
                          escape(fmt_params(g[0], digits=digits)), *[_objective_cell(g[0], m) for m, _ in objectives]]
                         for g in front_rows]))
    if note := epsilon_note(trials):
        parts.append(f"<p>{escape(note[0].upper() + note[1:])}.</p>")
    parts.append(_figure(folder / "pareto.png", "every trial; the front ringed"))
    return parts


def _sweep(r: dict[str, Any], folder: Path) -> str:
    from raymia.pareto import fmt_params, params_digits, with_epsilon

    trials = r.get("trials", [])
    objectives = with_epsilon([(o["metric"], o["mode"]) for o in r.get("objectives", [])], trials)
    front = set(r.get("front", []))
    parts = [f"<h1>Sweep {escape(str(r.get('name')))}</h1>", _sweep_sub(r)]
    beside = [f"<a href='{n}'>{what}</a>" for n, what in SWEEP_FILES if (folder / n).is_file()]
    if r.get("mlflow_parent_run_id"):
        beside.append(f"MLflow parent run {escape(str(r['mlflow_parent_run_id']))}")
    if beside:
        parts.append(f"<nav class='sub'>{' · '.join(beside)}</nav>")
    parts.extend(_sweep_front(r, folder))
    header = _sweep_header(objectives)
    digits = params_digits(trials)

    parts.append("<h2>All trials</h2>")
    rows, classes = [], []
    for t in trials:
        vals = ([_objective_cell(t, m) for m, _ in objectives] if t.get("status") == "ok"
                else [escape(str(t.get("status")))] * len(objectives))
        number = escape(str(t["trial"]))
        if (where := _trial_folder(t, folder)) is not None:
            number = f"<a href='{where}/'>{number}</a>"
        rows.append([number, escape(str(t["defense"])), escape(fmt_params(t, digits=digits)), *vals])
        classes.append("front" if t.get("trial") in front else "")
    parts.append(_table(header, rows, classes, caption="front rows highlighted; a trial's number links its "
                                                      "report's folder (`raymia report FOLDER` draws its page)"))
    failed = [t for t in trials if t.get("status") != "ok"]
    if failed:
        parts.append("<ul>" + "".join(f"<li>trial {escape(str(t['trial']))}: {escape(str(t.get('error')))}</li>"
                                      for t in failed) + "</ul>")

    fa = r.get("final_audit")
    if fa:
        parts.append("<h2>Final audit of the front</h2>")
        parts.append(_table(["trial", "defense", "models", *[m for m, _ in objectives]],
                            [[escape(str(a["trial"])), escape(str(a["defense"])), escape(str(a["num_models"])),
                              *[_objective_cell(a, m) for m, _ in objectives]] for a in fa]))
    parts.append(_spec(folder))
    return "".join(parts)
