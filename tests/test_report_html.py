"""report.html's numbers beside their std over targets: the digits the console prints; and the audit's result
as a notebook or a prompt shows it: a few lines naming the headline metrics with the audit's own values, the
page's tables and ROC inline (`_repr_html_`), its metrics as a DataFrame (the sweep's: test_api.py). A real
audit on digits (bank.engine local, 4 targets, bootstrap intervals)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shutil

import pytest

from raymia.audit import run_audit
from raymia.report.html import write_html
from raymia.spec import AuditSpec
from tests.conftest import tiny_spec_dict


def _cell(page: str, attack: str, column: int) -> str:
    row = page.split(f"<td>{attack}</td>", 1)[1].split("</tr>", 1)[0]
    return re.findall(r"<td>(.*?)</td>", row)[column]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A real audit (4 models, every one a target); each test that changes its report folder works on a copy."""
    root = tmp_path_factory.mktemp("audit")
    d = tiny_spec_dict(root, plan={"num_models": 4, "population": 200, "targets": "all"},
                       attacks=[{"name": "loss"}, {"name": "lira_online"}], bank={"engine": "local", "pack_size": 4},
                       tracking={"enabled": False}, train={"epochs": 10, "batch_size": 64, "lr": 0.002},
                       metrics={"bootstrap": 20})
    return run_audit(AuditSpec.model_validate(d), console=False)


def test_a_mean_with_trailing_zeros_keeps_its_std_to_four_decimals(audited, tmp_path):
    out = shutil.copytree(audited.out_dir, tmp_path / "audit")
    result = json.loads((out / "result.json").read_text())
    # AUC, in [0.1, 1): the console's "0.5178 ± 0.0233", so the page's too; balanced accuracy, an accuracy,
    # a percent as the console's "51.78% ± 2.33%"
    page = (out / "report.html").read_text()
    for a in ("loss", "lira_online"):
        ms = result["attacks"][a]
        mean, sd = ms["auc"], result["attacks_std_over_targets"][a]["auc"]
        assert _cell(page, a, 0) == f"{mean:.4f} ± {sd:.4f} [{ms['auc_ci_low']:.4f}, {ms['auc_ci_high']:.4f}]", a
        mean, sd = (result[k][a]["balanced_accuracy"] for k in ("attacks", "attacks_std_over_targets"))
        assert _cell(page, a, 1) == f"{100 * mean:.2f}% ± {100 * sd:.2f}%", a
    # a mean that is a round number (the quickstart's trial 1: rmia_online's balanced accuracy, exactly
    # 0.54 over its 8 targets, std 0.0218) was shown "0.54 ± 0.02", its std cut to the mean's two digits
    result["attacks"]["loss"]["balanced_accuracy"] = 0.54
    sd = result["attacks_std_over_targets"]["loss"]["balanced_accuracy"]
    # and an epsilon bound of 0 on every target (a defended model), which the console prints 0.0000 ± 0.0000
    result["attacks"]["loss"]["epsilon_lb"] = result["attacks_std_over_targets"]["loss"]["epsilon_lb"] = 0.0
    # a bootstrap interval, as the console prints it: [0.4630, 0.5808], not [0.463, 0.5808]
    result["attacks"]["loss"].update(auc_ci_low=0.463, auc_ci_high=0.5808)
    (out / "result.json").write_text(json.dumps(result))
    page = write_html(out).read_text()
    assert _cell(page, "loss", 1) == f"54.00% ± {100 * sd:.2f}%"
    assert _cell(page, "loss", 4) == "0.0000 ± 0.0000"
    assert _cell(page, "loss", 0).endswith(" [0.4630, 0.5808]")


def test_vulnerable_records_show_each_column_to_one_precision(audited):
    """vulnerable.csv writes z to 3 significant digits and scores to 6 without trailing zeros (4.3 beside
    4.51, 0.92 beside 0.986667): the page lines them up, z with 2 decimals, scores with 6 significant digits."""
    page = (audited.out_dir / "report.html").read_text()
    table = page.split("id='vulnerable'", 1)[1].split("</table>", 1)[0]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in table.split("<tr>")[2:]]
    assert len(rows) == 20
    for row in rows:
        z, score = row[6], row[8]
        assert re.fullmatch(r"-?\d+\.\d\d", z), z
        assert len(re.sub(r"e.*|\D", "", score).lstrip("0")) == 6, score


def test_inversion_attacks_that_tie_the_strongest_are_all_bold(audited, tmp_path):
    """With 5 private classes every attack's top-5 is 100%: each is the strongest, not only the first."""
    out = shutil.copytree(audited.out_dir, tmp_path / "audit")
    result = json.loads((out / "result.json").read_text())
    result["inversion"] = {
        "attacks": {"miface": {"top1": 0.6, "top5": 1.0, "knn_dist": 281.5, "fid": 508.3},
                    "gmi": {"top1": 1.0, "top5": 1.0, "knn_dist": 28.24, "fid": 41.74},
                    "brep_mi": {"top1": 0.95, "top5": 1.0, "knn_dist": 24.52, "fid": 55.82}},
        "strongest": {"top1": "gmi", "top5": "miface", "knn_dist": "brep_mi", "fid": "gmi"}}
    (out / "result.json").write_text(json.dumps(result))
    page = write_html(out).read_text()
    assert [_cell(page, a, 1) for a in ("miface", "gmi", "brep_mi")] == ["<b>100.00%</b>"] * 3
    assert [_cell(page, a, 0) for a in ("miface", "gmi", "brep_mi")] == ["60.00%", "<b>100.00%</b>", "95.00%"]
    assert _cell(page, "brep_mi", 2) == "<b>24.52</b>" and _cell(page, "gmi", 2) == "28.24"
    assert "the lowest KNN distance and FID" in page


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def test_an_audit_prints_as_its_headline_metrics(audited):
    """repr and str: the audit, its utility and each attack's AUC and TPR at the lowest FPR level every attack
    resolves as mean ± std over the targets [bootstrap interval], the folder; no arrays, and short."""
    text = repr(audited)
    assert str(audited) == text and len(text) < 800 and "array" not in text and "spec=" not in text
    flat = audited.flat_metrics()
    lines = text.splitlines()
    assert lines[0] == f"AuditResult tiny [{audited.fingerprint}]: defense none, 4 models, 4 targets (mean ± std over targets)"
    assert lines[1] == (f"  utility: train acc {_pct(flat['train_accuracy'])}  test acc {_pct(flat['test_accuracy'])}"
                        f"  gap {_pct(flat['generalization_gap'])}  test ECE {flat['test_ece']:.4f}")
    level = min(f for f in (0.1, 0.01, 0.001, 0.0001, 0.00001)
                if all(flat.get(f"{a}/tpr_fpr_{f:g}") is not None for a in ("loss", "lira_online")))
    assert level < 0.1  # 1% resolves on these targets' non-members: not the least telling level, 10%
    for line, a in zip(lines[2:4], ("loss", "lira_online"), strict=True):
        auc, tpr = (f"{a}/auc", f"{a}/tpr_fpr_{level:g}")
        assert line == (f"  {a:<11}  AUC {flat[auc]:.4f} ± {flat['std/' + auc]:.4f} "
                        f"[{flat[auc + '_ci_low']:.4f}, {flat[auc + '_ci_high']:.4f}]  "
                        f"TPR@{100 * level:g}%FPR {_pct(flat[tpr])} ± {_pct(flat['std/' + tpr])} "
                        f"[{_pct(flat[tpr + '_ci_low'])}, {_pct(flat[tpr + '_ci_high'])}]")
    assert lines[4:] == [f"  report: {audited.out_dir}"]


def test_a_notebook_shows_the_pages_tables_and_roc(audited, tmp_path):
    html = audited._repr_html_()
    page = (audited.out_dir / "report.html").read_text()
    # the page's own utility and attack tables, cell for cell
    tables = re.findall(r"<table>.*?</table>", html)
    assert len(tables) == 2 and all(t in page for t in tables)
    flat = audited.flat_metrics()
    row = re.search(r"<tr><td>loss</td>(.*?)</tr>", tables[1]).group(1)
    assert re.findall(r"<td>(.*?)</td>", row)[0] == (
        f"{flat['loss/auc']:.4f} ± {flat['std/loss/auc']:.4f} "
        f"[{flat['loss/auc_ci_low']:.4f}, {flat['loss/auc_ci_high']:.4f}]")
    assert f"<td>test_accuracy</td><td>{_pct(flat['test_accuracy'])}" in tables[0]
    # roc.png as a PNG data URI: the folder's file, byte for byte
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'>", html)
    assert [alt for alt, _ in images] == ["ROC curves (log-log), first target"]
    assert base64.b64decode(images[0][1]) == (audited.out_dir / "roc.png").read_bytes()
    assert "<h1" not in html and "<style" not in html  # a notebook's own headings and styles stay its own
    # a user's strings are text: a name the schema would refuse, a folder named like markup
    odd = dataclasses.replace(audited, spec=audited.spec.model_copy(update={"name": "<script>alert(1)</script>"}),
                              out_dir=tmp_path / "<img src=x onerror=alert(2)>")
    html = odd._repr_html_()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<img" not in html  # no roc.png in that folder: no figure


def test_an_audits_table_is_its_flat_metrics(audited):
    table = audited.table()
    flat = audited.flat_metrics()
    assert list(table.index) == ["loss", "lira_online"] and table.index.name == "attack"
    assert list(table.columns[:6]) == ["auc", "auc_std", "auc_ci_low", "auc_ci_high", "balanced_accuracy",
                                       "balanced_accuracy_std"]
    assert {"tpr_fpr_0.01", "tpr_fpr_0.01_std", "tpr_fpr_0.01_ci_low", "epsilon_lb"} <= set(table.columns)
    for a in table.index:
        for k in table.columns:
            v = flat[f"std/{a}/{k.removesuffix('_std')}" if k.endswith("_std") else f"{a}/{k}"]
            got = table.loc[a, k]
            assert (v is None and math.isnan(got)) or got == v, (a, k)
