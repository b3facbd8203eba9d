"""benchmarks/inversion_tldmi.py runs end to end on digits at a tiny size (no Ray, no MLflow, no Olivetti
file) and reports finite, in-range scores (it is run by hand, at full size, for the docs; this keeps it from
rotting between runs)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inversion_tldmi_smoke(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import inversion_tldmi as it

    out = tmp_path / "img"
    res = it.main(["--data", "digits", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                   "--depths", "0", "3", "--epochs", "4", "--pretrain-epochs", "2", "--evaluator-epochs", "3",
                   "--gan-steps", "20", "--gmi-steps", "10", "--miface-steps", "10", "--per-class", "1",
                   "--restarts", "1", "--brep-patience", "3", "--threads", "1"])
    for name in ("grid", "trend"):
        path = Path(res[name])
        assert path == out / f"inversion_digits_{name}.png" and path.stat().st_size > 5_000
    rows = res["rows"]
    assert list(rows) == ["none", "d0", "d3"]
    for r in rows.values():
        for key, v in r.items():
            if key in ("label", "frozen_layers"):
                continue
            if key.endswith("_top5") and res["k_priv"] <= 5:  # every private class is in the top 5: undefined
                assert math.isnan(v), (r["label"], key, v)
                continue
            assert math.isfinite(v), (r["label"], key, v)
            if key.endswith(("_knn_dist", "_fid")):
                assert v >= 0, (r["label"], key, v)
            else:
                assert 0 <= v <= 1, (r["label"], key, v)
        assert r["test_accuracy"] > 0.3  # 5 private classes among 10 outputs: the target learnt something
    assert rows["none"]["frozen_fraction"] == rows["d0"]["frozen_fraction"] == 0
    assert rows["d3"]["frozen_layers"] == 3 and 0.5 < rows["d3"]["frozen_fraction"] < 1
    # TL-DMI's backbone pretrained on the public classes only: its cache exists beside the GAN's
    cache = {p.name.split("-")[0] for p in (tmp_path / "work" / "cache").iterdir()}
    assert {"tl_dmi", "gmi", "evaluator", "lomma"} <= cache  # LOMMA's students beside them
    assert all(f"{col}_top1" in r for r in rows.values() for col in ("miface", "gmi", "lomma", "brep"))
    printed = capsys.readouterr().out
    assert "| TL-DMI depth 3 |" in printed and "| LOMMA-GMI top-1 |" in printed and "| BREP-MI FID |" in printed and printed.count("\n|") >= 4  # header, rule, 3 rows
