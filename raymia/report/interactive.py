"""Interactive sweep figures for MLflow (HTML with plotly, its script embedded: MLflow shows HTML artifacts
in a sandboxed frame without network access): the Pareto front, every trial labelled by the number the
console and front.md use, and Optuna's hyperparameter importances for each objective."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raymia.errors import first_line

log = logging.getLogger("raymia")


def pareto_html(trials: list[dict[str, Any]], objectives: list[tuple[str, str]], front: list[int], path: Path) -> Path | None:
    """The trials' first two objectives (x: the second, y: the first, as pareto.png, with its axis titles),
    the front joined and ringed, the undefended trial a star as on pareto.png, each point's hover text its
    trial number, defense and params. None with fewer than 2 objectives."""
    import plotly.graph_objects as go

    from raymia.metrics import spread_key
    from raymia.pareto import axis_label, fmt_params, undefended_label, undefended_trial

    if len(objectives) < 2:
        return None
    (y_key, y_mode), (x_key, x_mode) = objectives[0], objectives[1]
    ok = [t for t in trials if t.get("status") == "ok" and isinstance(t.get(x_key), int | float)
          and isinstance(t.get(y_key), int | float)]
    on = set(front)
    fig = go.Figure()
    def spread(pts, key):  # each point's std over targets, as pareto.png draws it
        sd = [t.get(spread_key(key)) for t in pts]
        ok_sd = all(isinstance(v, int | float) for v in sd)
        return {"type": "data", "array": sd, "thickness": 1, "width": 0, "color": "rgba(0,0,0,0.3)"} if ok_sd else None

    base = undefended_trial(ok, objectives)
    groups = [(d, [t for t in ok if t["defense"] == d and t is not base], {}) for d in sorted({t["defense"] for t in ok})]
    if base is not None:
        groups.append((undefended_label(base), [base], {"symbol": "star", "color": "red"}))
    for name, pts, look in groups:
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[t[x_key] for t in pts], y=[t[y_key] for t in pts], mode="markers+text", name=name,
            error_x=spread(pts, x_key), error_y=spread(pts, y_key),
            text=[str(t["trial"]) for t in pts], textposition="top center",
            marker={"size": [14 if t["trial"] in on or t is base else 9 for t in pts], **look,
                    "line": {"width": [2 if t["trial"] in on else 0 for t in pts], "color": "black"}},
            hovertext=[f"trial {t['trial']} ({t['defense']}{': ' + fmt_params(t) if fmt_params(t) != '-' else ''})"
                       f"<br>{y_key} = {t[y_key]:.4g}<br>{x_key} = {t[x_key]:.4g}"
                       + ("<br>on the front" if t["trial"] in on else "") for t in pts],
            hoverinfo="text"))
    edge = sorted((t for t in ok if t["trial"] in on), key=lambda t: t[x_key])
    if len(edge) > 1:
        fig.add_trace(go.Scatter(x=[t[x_key] for t in edge], y=[t[y_key] for t in edge], mode="lines",
                                 name="front", hoverinfo="skip",  # pareto.png's staircase (its front_step)
                                 line={"dash": "dot", "color": "black", "shape": "vh" if x_mode == "max" else "hv"}))
    xs = [t[x_key] for t in ok if t[x_key] > 0]
    log_x = bool(xs) and max(xs) / min(xs) > 20  # rates that span decades
    title = f"Pareto front: {len(on)} of {len(ok)} trials"
    fig.update_layout(
        title=f"{title} (bars: std over targets)", legend={"title": "defense"},
        xaxis={"title": axis_label(x_key, x_mode) + (", log scale" if log_x else ""), "type": "log" if log_x else "linear",
               **({"dtick": "D1"} if log_x else {})},  # every decade's 2 and 5 labelled too
        yaxis={"title": axis_label(y_key, y_mode)}, template="plotly_white")
    _write_page(fig, path, title)
    return path


def _write_page(fig, path: Path, title: str) -> None:
    """The figure as a page of its own, plotly's script embedded, with a title and a language."""
    import html

    page = fig.to_html(include_plotlyjs=True, full_html=True)
    page = page.replace("<html>", '<html lang="en">', 1).replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    Path(path).write_text(page, encoding="utf-8")


FEW_TRIALS = 20  # below this many finished trials, importances are a rough guide (the page says so)


def param_importances(storage: str, study_name: str, objectives: list[tuple[str, str]]
                      ) -> tuple[list[tuple[str, dict[str, float]]], int] | None:
    """([(objective, {param: share of the objective's variance})], finished trials) by fANOVA (a seeded
    random forest over the finished trials; the shares sum to 1); None when the study cannot tell (fewer
    than 2 finished trials, or nothing varied). fANOVA, not Optuna 5's default PED-ANOVA: on a sweep's few
    trials PED-ANOVA's top quantile holds one or two trials, and it gave HAMP's output_modification, which
    alone moves the quickstart's TPR from 2% to 30%, no importance at all."""
    import warnings

    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        panels = []
        for i, (metric, _) in enumerate(objectives):
            with warnings.catch_warnings():  # its notes on short studies: the page's title says it instead
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=lambda t, i=i: t.values[i])
            panels.append((metric, imp))
    except (RuntimeError, ValueError, KeyError) as e:  # Optuna's "cannot evaluate importance" cases
        log.info("no hyperparameter importances for %s: %s", study_name, first_line(e))
        return None
    if not any(imp for _, imp in panels):
        return None
    return panels, len(done)


def importance_html(storage: str, study_name: str, objectives: list[tuple[str, str]], path: Path) -> Path | None:
    """`param_importances` as a page: one panel per objective, each parameter's share of its variance."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    found = param_importances(storage, study_name, objectives)
    if found is None:
        return None
    panels, n = found
    # one panel under the other, each the page's width: side by side, the second panel's parameter names
    # (hamp.output_modification) reached into the first panel and over its longer bars
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[m for m, _ in panels],
                        vertical_spacing=0.25 / len(panels))  # about 70 px: the ticks and the next title
    longest = max(len(name) for _, imp in panels for name in imp)
    for r, (_, imp) in enumerate(panels, start=1):
        names = list(imp)[::-1]
        fig.add_trace(go.Bar(x=[imp[n] for n in names], y=names, orientation="h", showlegend=False,
                             marker_color="#4c72b0"), row=r, col=1)
        fig.update_xaxes(range=[0, 1], row=r, col=1)
    fig.update_xaxes(title_text="share of the objective's variance (fANOVA)", row=len(panels), col=1)
    rough = ": a rough guide" if n < FEW_TRIALS else ""
    title = f"hyperparameter importance per objective ({n} trials{rough})"
    fig.update_layout(title=title, template="plotly_white", height=150 + 300 * len(panels),
                      margin={"l": 40 + 7 * longest})  # the names beside the bars, whole
    _write_page(fig, path, "hyperparameter importance")
    return path
