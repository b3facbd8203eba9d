"""benchmarks/hamp_calibration.py runs end to end at a tiny size (no Ray, no MLflow) and reports sane
values (it is run by hand, at full size, for docs/validity.md; this keeps it from rotting between runs)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hamp_calibration_writes_the_figure_and_finite_rates(tmp_path, one_thread, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hamp_calibration as hc

    out = tmp_path / "img" / "hamp_calibration.png"
    # population 200: 100 non-members per target, the fewest that resolve TPR at 1% FPR
    res = hc.main(["--epochs", "3", "--population", "200", "--output-dir", str(tmp_path / "runs"),
                   "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000 and res["figure"] == str(out)
    assert (tmp_path / "runs" / "signals").is_dir()  # the store went where it was told
    rows = res["rows"]
    assert list(rows) == [key for key, *_ in hc.SETTINGS]
    for r in rows.values():
        assert r["targets"] == 8
        for k, v in r.items():
            if k in ("label", "targets"):
                continue
            assert v is not None and math.isfinite(v) and 0 <= v <= 1, (r["label"], k, v)
        assert r["test_accuracy"] > 0.3  # 3 epochs: the models learnt something (chance is 0.1)
    # HAMP's members sit at or below its soft label's true-class mass (0.26 on 10 classes)
    assert rows["hamp_no_om"]["p_in"] < hc.soft_label_true_mass(10, 0.95) + 0.05
    printed = capsys.readouterr().out
    assert "| HAMP, no output mod. |" in printed and printed.count("\n|") >= 7  # header, rule, 5 rows
