"""report.html's numbers beside their std over targets: the digits the console prints. A real audit on
digits (bank.engine local)."""

from __future__ import annotations

import json
import re

from raymia.audit import run_audit
from raymia.report.html import write_html
from raymia.spec import AuditSpec
from tests.conftest import tiny_spec_dict


def _cell(page: str, attack: str, column: int) -> str:
    row = page.split(f"<td>{attack}</td>", 1)[1].split("</tr>", 1)[0]
    return re.findall(r"<td>(.*?)</td>", row)[column]


def test_a_mean_with_trailing_zeros_keeps_its_std_to_four_decimals(tmp_path):
    d = tiny_spec_dict(tmp_path, plan={"num_models": 4, "population": 200, "targets": "all"},
                       attacks=[{"name": "loss"}, {"name": "lira_online"}], bank={"engine": "local", "pack_size": 4},
                       tracking={"enabled": False}, train={"epochs": 10, "batch_size": 64, "lr": 0.002})
    res = run_audit(AuditSpec.model_validate(d), console=False)
    result = json.loads((res.out_dir / "result.json").read_text())
    # AUC and balanced accuracy, in [0.1, 1): the console's "0.5178 ± 0.0233", so the page's too
    page = (res.out_dir / "report.html").read_text()
    for a in ("loss", "lira_online"):
        for col, key in ((0, "auc"), (1, "balanced_accuracy")):
            mean, sd = result["attacks"][a][key], result["attacks_std_over_targets"][a][key]
            assert _cell(page, a, col) == f"{mean:.4f} ± {sd:.4f}", (a, key)
    # a mean that is a round number (the quickstart's trial 1: rmia_online's balanced accuracy, exactly
    # 0.54 over its 8 targets, std 0.0218) was shown "0.54 ± 0.02", its std cut to the mean's two digits
    result["attacks"]["loss"]["balanced_accuracy"] = 0.54
    sd = result["attacks_std_over_targets"]["loss"]["balanced_accuracy"]
    # and an epsilon bound of 0 on every target (a defended model), which the console prints 0.0000 ± 0.0000
    result["attacks"]["loss"]["epsilon_lb"] = result["attacks_std_over_targets"]["loss"]["epsilon_lb"] = 0.0
    (res.out_dir / "result.json").write_text(json.dumps(result))
    page = write_html(res.out_dir).read_text()
    assert _cell(page, "loss", 1) == f"0.5400 ± {sd:.4f}"
    assert _cell(page, "loss", 4) == "0.0000 ± 0.0000"
