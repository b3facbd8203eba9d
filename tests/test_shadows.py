"""shadow_curve: attacks re-run with nested subsets of each target's shadows. The subsets are whole pairs of
its shadows, a view of the signals scores as fresh signals with that pool would (every attack's cached fits
name what they depend on), and at the audit's own count the curve is the audit's numbers."""

from __future__ import annotations

import numpy as np
import pytest

import raymia
from raymia.attacks import run_attack
from raymia.attacks.registry import ATTACKS
from raymia.audit import report_files as audit_report_files
from raymia.shadows import shadow_pools, shadow_units
from raymia.signals import Signals
from tests.conftest import ANSI, run_cli, terminal_bars


def paired_bank(m=12, p=80, q=2, c=4, z=40, seed=0) -> Signals:
    """Models 2j and 2j + 1 on complementary halves, membership lifting the true class's logit."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((m, p), dtype=bool)
    for j in range(0, m, 2):
        keep[j] = rng.random(p) < 0.5
        keep[j + 1] = ~keep[j]
    labels = rng.integers(0, c, p)
    logits = rng.normal(size=(m, q, p, c)).astype(np.float32)
    logits[:, :, np.arange(p), labels] += 1.5 * keep[:, None, :]
    pop = rng.normal(size=(m, q, z, c)).astype(np.float32)
    return Signals(logits, labels, keep, pop, rng.integers(0, c, z))


@pytest.mark.parametrize("attack", sorted(ATTACKS.names()))
@pytest.mark.parametrize("parent_pool", [None, "without 4 and 5"])
def test_a_view_scores_as_fresh_signals_with_its_pool(attack, parent_pool):
    """The view reads what the signals it came from cached (a loss threshold's sorted pool among them, which
    may lack the view's models) and must still score as signals that never saw their pool."""
    signals = paired_bank()
    if parent_pool:
        signals = signals.with_shadow_pool(~np.isin(np.arange(12), [4, 5]))
    pool = np.zeros(12, dtype=bool)
    pool[[4, 5, 8, 9]] = True
    run_attack(attack, None, signals, 0)  # fills the full signals' cache
    viewed = run_attack(attack, None, signals.with_shadow_pool(pool), 0)
    s = signals
    fresh = run_attack(attack, None, Signals(s.logits, s.labels, s.keep, s.pop_logits, s.pop_labels, shadow_pool=pool), 0)
    np.testing.assert_allclose(viewed, fresh, rtol=1e-12, atol=1e-12)
    if attack in ("loss", "lira_online", "rmia_offline", "shokri"):  # where these 4 shadows fit otherwise
        assert not np.allclose(fresh, run_attack(attack, None, signals, 0))


def test_pools_are_nested_whole_pairs_of_each_targets_shadows():
    signals = paired_bank()
    pools = shadow_pools(signals, [0, 1, 7], seed=3)
    for t, by_size in pools.items():
        assert list(by_size) == [2, 4, 8, 10]  # powers of two, then all 10 shadows (12 less the target's pair)
        assert np.array_equal(by_size[10], signals.shadow_mask(t))
        smaller = np.zeros(12, dtype=bool)
        for k, pool in by_size.items():
            assert pool.sum() == k and not (pool & ~signals.shadow_mask(t)).any()
            assert np.array_equal(pool[0::2], pool[1::2])  # whole pairs
            assert not (smaller & ~pool).any()  # holds every smaller one
            smaller = pool
    assert np.array_equal(pools[0][4], pools[1][4])  # a target and its pair: the same shadows to draw from ...
    again = shadow_pools(signals, [0, 1, 7], seed=3)
    assert all(np.array_equal(again[t][k], pools[t][k]) for t in pools for k in pools[t])
    other = shadow_pools(signals, [7], seed=4)
    assert any(not np.array_equal(other[7][k], pools[7][k]) for k in (2, 4))  # ... drawn in the seed's order


def test_a_size_no_pairs_reach_is_refused_with_those_that_are():
    signals = paired_bank()
    with pytest.raises(ValueError, match=r"shadows \[3\] cannot be drawn for target 0: its 10 shadows are "
                                         r"complementary pairs; accepted: 2, 4, 6, 8, 10"):
        shadow_pools(signals, [0], [3, 4])
    # a pool that splits a pair leaves a single model (10, its pair out of the pool), drawn alone
    s = signals.with_shadow_pool(np.array([True] * 11 + [False]))
    assert sorted(shadow_units(s, 0), key=len) == [(10,), (2, 3), (4, 5), (6, 7), (8, 9)]
    for k, pool in shadow_pools(s, [0])[0].items():
        assert pool.sum() == k and k in (1, 2, 3, 4, 5, 7, 8, 9)


def test_the_curve_at_the_audits_count_is_the_audit(tmp_path):
    spec = {"name": "curve", "plan": {"num_models": 8, "population": 200}, "model": {"params": {"hidden": [64]}},
            "attacks": ["loss", "lira_online", {"name": "rmia_offline", "label": "rmia_off"}],
            "bank": {"engine": "local", "pack_size": 4}, "output_dir": str(tmp_path / "runs")}
    result = raymia.run_audit(spec, ["train.epochs=6", "tracking.enabled=false"], console=False)
    curve = raymia.shadow_curve(result)
    assert curve.shadows == (2, 4, 6) and curve.targets == tuple(range(8)) and curve.attacks == ["loss", "lira_online",
                                                                                                  "rmia_off"]
    for a in curve.attacks:
        for metric in ("auc", "balanced_accuracy", "tpr_fpr_0.1"):
            assert curve.mean(a, metric)[-1] == pytest.approx(result.attacks[a][metric], abs=1e-12)
            assert curve.std(a, metric)[-1] == pytest.approx(result.attacks_std[a][metric], abs=1e-12)
    # a global loss threshold shifts every score alike: its AUC does not depend on the shadows at all
    assert np.allclose(curve.values["loss"]["auc"], curve.values["loss"]["auc"][-1])
    # rmia_offline tunes a on a shadow attacked by the others: one pair leaves none to do it with
    assert np.isnan(curve.values["rmia_off"]["auc"][0]).all() and not np.isnan(curve.values["rmia_off"]["auc"][1:]).any()
    assert curve.notes == (curve.notes[0],) and curve.notes[0].startswith("rmia_off with 2 shadows: n/a (rmia_offline a=")
    table = curve.table("tpr_fpr_0.1")
    assert list(table.index) == [2, 4, 6] and list(table.columns)[:2] == ["loss", "loss_std"]
    assert table["lira_online"].iloc[-1] == curve.mean("lira_online", "tpr_fpr_0.1")[-1]
    # from the report folder: the same numbers, nothing trained
    again = raymia.shadow_curve(result.out_dir, shadows=[2, 6])
    assert again.shadows == (2, 6)
    np.testing.assert_array_equal(again.values["lira_online"]["auc"], curve.values["lira_online"]["auc"][[0, 2]])
    png = curve.plot(tmp_path / "shadows.png", "tpr_fpr_0.1")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="no metric 'tpr_fpr_0.5' in this curve; it has auc, balanced_accuracy"):
        curve.plot(tmp_path / "x.png", "tpr_fpr_0.5")
    # the command: the table, shadows.csv (every metric) and shadows.png beside the report
    done = run_cli("shadows", str(result.out_dir), "--metric", "tpr_fpr_0.1", "--shadows", "2", "6")
    assert done.returncode == 0, done.stderr
    assert "TPR@10%FPR by shadow models per target" in done.stdout and "rmia_off with 2 shadows: n/a" in done.stdout
    at6 = f"{100 * curve.mean('lira_online', 'tpr_fpr_0.1')[-1]:.2f}% ± {100 * curve.std('lira_online', 'tpr_fpr_0.1')[-1]:.2f}%"
    assert at6 in done.stdout  # the table's cells: mean ± std, as the audit's console writes them
    rows = [line.split(",") for line in (result.out_dir / "shadows.csv").read_text().splitlines()]
    assert rows[0] == ["attack", "metric", "shadows", "mean", "std"] and len(rows) == 1 + 3 * 7 * 2
    lira = {int(r[2]): float(r[3]) for r in rows if r[:2] == ["lira_online", "auc"]}
    assert lira == {2: again.mean("lira_online")[0], 6: again.mean("lira_online")[1]}
    assert (result.out_dir / "shadows.png").read_bytes()[:4] == b"\x89PNG"
    page = (result.out_dir / "report.html").read_text()  # written again with the figure in it
    assert "<h2 id='shadows'>Shadow models</h2>" in page and page.count("data:image/png;base64,") == 3  # roc, hist.
    assert {p.name for p in audit_report_files(result.out_dir)} >= {"shadows.png", "shadows.csv"}  # a re-run removes them
    for args, line in ((["--shadows", "3"], "raymia: error: --shadows: shadows [3] cannot be drawn for target 0"),
                       (["--metric", "tpr_fpr_0.5"], "raymia: error: --metric: 'tpr_fpr_0.5' is not among the "
                                                     "audit's metrics; accepted: auc, balanced_accuracy, tpr_fpr_0.1")):
        bad = run_cli("shadows", str(result.out_dir), *args)
        assert bad.returncode == 2 and bad.stderr.startswith(line), bad.stderr
    bad = run_cli("shadows", str(tmp_path))
    assert bad.returncode == 2 and "holds no audit report (spec.yaml)" in bad.stderr


def test_a_curve_of_signals_alone_shows_its_progress_on_a_terminal():
    with terminal_bars() as (screen, _):
        curve = raymia.shadow_curve(signals=paired_bank(), attacks=["lira_online", ("rmia_offline", {"a": 0.3})],
                                    targets=[0, 5], shadows=[2, 10])
    assert curve.shadows == (2, 10) and curve.attacks == ["lira_online", "rmia_offline"] and not curve.notes
    assert "[raymia] shadow curve: attacks x targets x sizes" in ANSI.sub("", screen.getvalue())
    assert "8/8" in ANSI.sub("", screen.getvalue())


def test_the_label_only_attack_an_output_defense_adds_is_on_the_curve(tmp_path):
    """A defense that changes the released outputs makes the audit add the calibrated label-only attack
    (audit.attacks_to_run); the curve of that audit has it too, from the result or its folder."""
    spec = {"name": "curve-conf", "plan": {"num_models": 6, "population": 200}, "model": {"params": {"hidden": [64]}},
            "attacks": ["loss"], "defense": {"name": "confidence", "params": {"top_k": 1}},
            "bank": {"engine": "local", "pack_size": 6}, "output_dir": str(tmp_path / "runs")}
    result = raymia.run_audit(spec, ["train.epochs=4", "tracking.enabled=false"], console=False)
    assert list(result.attacks) == ["loss", "label_only"]
    for of in (result, result.out_dir, result.out_dir / "result.json"):
        curve = raymia.shadow_curve(of)
        assert curve.attacks == ["loss", "label_only"] and curve.shadows == (2, 4)
        assert curve.mean("label_only")[-1] == pytest.approx(result.attacks["label_only"]["auc"], abs=1e-12)
