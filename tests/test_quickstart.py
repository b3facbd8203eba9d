"""The README's main job: sweeps/quickstart.yaml runs in minutes on 2 CPUs and shows a real trade-off."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from raymia.resolve import load_spec
from raymia.spec import SweepSpec
from tests.conftest import chromium_page, decoded_images

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def test_quickstart_sweep(ray_local, tmp_path):
    from raymia.sweep import run_sweep

    spec = load_spec(QUICKSTART, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], kind=SweepSpec)
    t0 = time.perf_counter()
    result = run_sweep(spec, output_dir=tmp_path / "runs", console=False)
    seconds = time.perf_counter() - t0
    assert seconds < 300, f"quickstart took {seconds:.0f}s"
    ok = [t for t in result.trials if t["status"] == "ok"]
    assert len(ok) == spec.sweep.num_trials + 1  # the undefended baseline, then the searched trials
    assert [t["trial"] for t in result.trials] == list(range(spec.sweep.num_trials + 1))
    assert ok[0]["defense"] == "none"
    assert len(result.front) >= 2, json.dumps(result.trials, indent=1, default=str)
    # The undefended model leaks: LiRA finds members well above chance at 1% FPR.
    assert ok[0]["lira_online/tpr_fpr_0.01"] > 0.03 and ok[0]["lira_online/auc"] > 0.6
    # Some HAMP setting cuts that leakage to at most half while keeping accuracy within 2 points.
    best = min(t["lira_online/tpr_fpr_0.01"] for t in ok[1:]
               if t["test_accuracy"] >= ok[0]["test_accuracy"] - 0.02)
    assert best <= ok[0]["lira_online/tpr_fpr_0.01"] / 2
    # The hypervolume counts trade-offs down to the quickstart's accuracy reference of 0.9: that trial alone
    # dominates a box of it, so the front's volume is at least as large.
    assert result.hypervolume_reference == {"test_accuracy": 0.9, "lira_online/tpr_fpr_0.01": ok[0]["lira_online/tpr_fpr_0.01"],
                                            "given": ["test_accuracy"], "trial": 0}
    assert result.hypervolume >= (ok[0]["test_accuracy"] - 0.02 - 0.9) * (ok[0]["lira_online/tpr_fpr_0.01"] - best) > 0
    # Every objective is the mean over the 8 leave-one-out targets, with its spread beside it.
    assert all(0 < t["std/lira_online/tpr_fpr_0.01"] < 0.5 and t["std/test_accuracy"] > 0 for t in ok)
    front_md = (tmp_path / "runs" / "sweeps" / "quickstart" / "front.md").read_text()
    assert "mean over 8 target(s)" in front_md and front_md.count("±") >= 2 * len(ok)
    # HAMP's output modification keeps labels: the label-only attack joins worst/ in those trials only.
    for t in ok:
        modifies = t["defense"] == "hamp" and t["params"]["output_modification"]
        assert ("label_only/auc" in t) == modifies
        if modifies:
            assert t["worst/auc"] >= t["label_only/auc"]
    # the interactive figures MLflow keeps: every trial by its number, and Optuna's importances per objective
    sweep_dir = tmp_path / "runs" / "sweeps" / "quickstart"
    # the sweep's page links each trial's report folder; a trial's page, drawn later, says which trial it is
    from raymia.report.html import write_html

    page = (sweep_dir / "report.html").read_text()
    for t in ok:
        where = "baseline" if t["trial"] == 0 else f"trials/{t['trial_id']}"
        assert f"<td><a href='{where}/'>{t['trial']}</a></td>" in page, where
        trial_page = write_html(sweep_dir / where).read_text()
        up = "../report.html" if t["trial"] == 0 else "../../report.html"
        assert f"<h1>Audit quickstart: trial {t['trial']} of <a href='{up}'>its sweep</a></h1>" in trial_page
    pareto = (sweep_dir / "pareto.html").read_text()
    assert all(f"trial {t['trial']} (" in pareto for t in ok)
    assert '<html lang="en">' in pareto and f"<title>Pareto front: {len(result.front)} of {len(ok)} trials</title>" in pareto
    assert '"error_y":{"array":[' in pareto.replace(" ", "")  # each point's std over targets
    importance = (sweep_dir / "importance.html").read_text()
    assert all(p in importance for p in ("hamp.gamma", "hamp.alpha", "hamp.output_modification"))
    # the switch that moves LiRA's TPR from about 30% to 2% leads its objective's importances (Optuna's
    # default evaluator gave it none on these 7 trials)
    from raymia.report.interactive import param_importances

    panels, n = param_importances(f"sqlite:///{sweep_dir / 'optuna.db'}", "raymia-quickstart",
                                  [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")])
    lira = dict(panels)["lira_online/tpr_fpr_0.01"]
    assert n == 7 and max(lira, key=lira.get) == "hamp.output_modification" and lira["hamp.output_modification"] > 0.5
    _check_report(sweep_dir / "report.html", result)


def _check_report(page: Path, result) -> None:
    """The sweep's report.html as Chromium shows it: the front with each objective's spread, the Pareto plot
    decoded, every trial with the front's rows marked, the spec."""
    with chromium_page(page) as tab:
        assert tab.title() == "raymia sweep quickstart"
        links = tab.locator("nav a")  # the files beside the page, which it links
        assert sorted(links.nth(i).get_attribute("href") for i in range(links.count())) == [
            "front.md", "importance.html", "pareto.html", "spec.yaml"]
        front = tab.locator("#front + p + table tbody tr")
        assert front.count() == len(result.front)
        shown = sorted(int(front.nth(i).locator("td").first.inner_text()) for i in range(front.count()))
        assert shown == sorted(result.front_trials)
        by_number = {t["trial"]: t for t in result.trials}
        objectives = [o.metric for o in result.spec.sweep.objectives]
        front_md = (page.parent / "front.md").read_text()
        for i in range(front.count()):
            cells = front.nth(i).locator("td").all_inner_texts()
            trial = by_number[int(cells[0])]
            # mean ± std over the 8 targets, as the console and front.md write it (fractions, not percents)
            assert cells[3:] == [f"{trial[m]:.4f} ± {trial['std/' + m]:.4f}" for m in objectives], cells
            assert all(f"| {c} |" in front_md for c in cells[3:]), cells
        ((alt, w, h),) = decoded_images(tab)
        assert w > 300 and h > 300
        assert tab.locator("tr.front").count() == len(result.front)
        assert tab.locator("table").nth(1).locator("tbody tr").count() == len(result.trials)
        assert "defense: hamp" in tab.inner_text("#spec")
        assert f"hypervolume vs test_accuracy 0.9, the undefended trial's lira_online/tpr_fpr_0.01: " \
               f"{result.hypervolume:.6g}" in tab.inner_text("p.sub")
