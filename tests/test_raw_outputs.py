"""metrics.raw_outputs: the same models attacked before the defense's post-processing, beside what a
querier sees. Real training on digits (bank.engine local)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from raymia.audit import read_signals, run_audit
from raymia.errors import RaymiaError, SpecError
from raymia.spec import AuditSpec, SweepSpec
from raymia.store import SignalStore
from tests.conftest import tiny_spec_dict


def _spec(tmp_path, defense: dict, raw: bool) -> AuditSpec:
    d = tiny_spec_dict(tmp_path, attacks=[{"name": "loss"}, {"name": "lira_online"}],
                       bank={"engine": "local", "pack_size": 4}, tracking={"enabled": False},
                       defense=defense, metrics={"raw_outputs": raw})
    return AuditSpec.model_validate(d)


@pytest.fixture(scope="module")
def hamp(tmp_path_factory):
    """One HAMP bank with output modification, audited with and without the raw outputs."""
    d = tmp_path_factory.mktemp("raw")
    defense = {"name": "hamp", "params": {"gamma": 0.9, "alpha": 0.001, "output_modification": True}}
    with_raw = run_audit(_spec(d, defense, True), console=False)
    without = run_audit(_spec(d, defense, False), console=False)
    return d, with_raw, without


def test_raw_outputs_of_hamp_are_hamp_without_its_output_modification(hamp, tmp_path):
    """HAMP's output modification changes no training: the raw outputs are, bit for bit, those of the
    same HAMP setting with `output_modification: false`, and so are the attacks on them."""
    _, with_raw, _ = hamp
    off = {"name": "hamp", "params": {"gamma": 0.9, "alpha": 0.001, "output_modification": False}}
    trained_alone = run_audit(_spec(tmp_path, off, False), console=False)
    np.testing.assert_array_equal(read_signals(with_raw, raw=True).logits, read_signals(trained_alone).logits)
    np.testing.assert_array_equal(read_signals(with_raw, raw=True).pop_logits, read_signals(trained_alone).pop_logits)
    raw = with_raw.raw_attacks
    assert {a: raw[a] for a in ("loss", "lira_online")} == trained_alone.attacks


def test_raw_outputs_show_the_leakage_hamps_output_modification_hides(hamp):
    d, with_raw, without = hamp
    # a bank of its own (its packs hold more), whose released outputs are bit for bit the other bank's: the
    # raw queries draw nothing from the query generators
    assert with_raw.fingerprint != without.fingerprint
    released, plain = read_signals(with_raw), read_signals(without)
    np.testing.assert_array_equal(released.logits, plain.logits)
    np.testing.assert_array_equal(released.pop_logits, plain.pop_logits)
    assert with_raw.attacks == without.attacks and without.raw_attacks is None
    raw = read_signals(with_raw, raw=True)
    assert raw.logits.shape == released.logits.shape and not np.allclose(raw.logits, released.logits)
    # HAMP's output modification keeps every label and flattens the scores
    np.testing.assert_array_equal(raw.logits.argmax(-1), released.logits.argmax(-1))
    members = raw.keep[:, None, :].repeat(raw.logits.shape[1], 1)
    p_raw = softmax(raw.logits, -1).max(-1)[members].mean()
    p_released = softmax(released.logits, -1).max(-1)[members].mean()
    assert p_raw > p_released + 0.05, (p_raw, p_released)
    # what the training alone leaves: LiRA finds far more before the outputs are modified
    auc = with_raw.flat_metrics()
    assert auc["raw/lira_online/auc"] > auc["lira_online/auc"] + 0.2, auc
    assert auc["raw/worst/auc"] == max(auc["raw/loss/auc"], auc["raw/lira_online/auc"], auc["raw/label_only/auc"])
    assert "std/raw/lira_online/auc" in auc and "raw/test_accuracy" not in auc
    saved = (with_raw.out_dir / "result.json").read_text()
    assert '"raw_attacks"' in saved and '"raw_attacks"' not in (without.out_dir / "result.json").read_text()
    # roc.png draws each raw curve beside its attack's (dashed, in its colour)
    assert {"raw/lira_online", "lira_online"} <= set(with_raw.roc) and not any("raw/" in k for k in without.roc)
    page = (with_raw.out_dir / "report.html").read_text()
    raw_table = page.split("<h3 id='raw'>")[1].split("</table>")[0]
    assert "<td>lira_online</td>" in raw_table and f"{auc['raw/lira_online/auc']:.4f}" in raw_table
    assert "id='raw'" not in (without.out_dir / "report.html").read_text()


def test_a_defense_that_post_processes_nothing_has_its_released_outputs_as_raw(tmp_path):
    res = run_audit(_spec(tmp_path, {"name": "label_smoothing", "params": {"smoothing": 0.1}}, True), console=False)
    assert res.raw_attacks == res.attacks
    m = res.flat_metrics()
    assert m["raw/lira_online/tpr_fpr_0.1"] == m["lira_online/tpr_fpr_0.1"]
    store = SignalStore(res.spec.output_dir, res.fingerprint, 4, 8)
    assert all("raw_logits" not in store.read_pack(p) for p in range(store.num_packs))  # nothing stored twice
    np.testing.assert_array_equal(read_signals(res, raw=True).logits, read_signals(res).logits)


def test_non_adaptive_shadow_packs_are_the_plain_undefended_bank_s(tmp_path):
    d = tiny_spec_dict(tmp_path, defense={"name": "hamp"}, attacker="non_adaptive", plan={"num_models": 8,
                       "population": 300, "targets": [0]}, bank={"pack_size": 2}, metrics={"raw_outputs": True})
    spec = AuditSpec.model_validate(d)
    plain = AuditSpec.model_validate({**d, "metrics": {}})
    shared = spec.pack_fingerprints()
    assert shared and shared == plain.pack_fingerprints() and 0 not in shared
    assert spec.fingerprint() != plain.fingerprint()


def test_raw_metrics_as_sweep_objectives_need_the_raw_outputs(tmp_path):
    from raymia.metric_names import check_metric_names

    d = {**tiny_spec_dict(tmp_path), "sweep": {"defense": "hamp"}}
    check_metric_names(SweepSpec.model_validate({**d, "metrics": {"raw_outputs": True}}),
                       ["raw/lira_online/tpr_fpr_0.01", "raw/worst/auc"], "sweep.objectives")
    with pytest.raises(SpecError, match=r"sweep.objectives.0.metric: unknown metric 'raw/lira_online/auc'.*"
                                        r"raw/ATTACK/METRIC \(with metrics.raw_outputs: true\)"):
        check_metric_names(SweepSpec.model_validate(d), ["raw/lira_online/auc"], "sweep.objectives")


def test_reading_raw_signals_of_a_bank_without_them_says_what_to_set(hamp):
    _, _, without = hamp
    with pytest.raises(RaymiaError, match=r"^metrics.raw_outputs: raw signals are stored only by a bank with"):
        read_signals(without, raw=True)


@pytest.mark.parametrize(("defense", "says", "stored"), [
    ({"name": "hamp"}, "; each also before the defense's post-processing (raw/)", 2),
    ({"name": "label_smoothing"}, "; raw/ as released (the defense post-processes no output)", 1),
])
def test_check_says_which_outputs_raw_attacks_see(tmp_path, defense, says, stored):
    """... and counts the raw logits in the signals' size: the audited points' and test split's outputs
    twice where the defense post-processes."""
    import yaml

    from raymia.check import check_spec

    path = tmp_path / "raw.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, defense, True).model_dump(mode="json")))
    report = check_spec(path)
    assert dict(report.rows)["attacks"].endswith(says)
    assert report.signal_bytes == stored * check_spec(path, ["metrics.raw_outputs=false"]).signal_bytes


def test_the_console_shows_the_raw_table_only_where_outputs_were_post_processed(hamp, capsys):
    from raymia.audit import print_audit_table

    _, with_raw, without = hamp
    print_audit_table(with_raw)
    out = capsys.readouterr().out
    assert "the same models' outputs before hamp's post-processing (raw/)" in out
    raw_table = out.split("(raw/)")[1]
    assert f"{with_raw.raw_attacks['lira_online']['auc']:.4f}" in raw_table
    print_audit_table(without)
    assert "raw/" not in capsys.readouterr().out
    # the DataFrame holds both, under flat_metrics' names and values
    table, flat = with_raw.table(), with_raw.flat_metrics()
    assert list(table.index) == [*with_raw.attacks, *(f"raw/{a}" for a in with_raw.raw_attacks)]
    assert table.loc["raw/lira_online", "auc"] == flat["raw/lira_online/auc"] != flat["lira_online/auc"]


def test_a_non_adaptive_bank_stores_raw_outputs_where_its_targets_post_process(tmp_path):
    """Target 0 is defended, the others are undefended shadows: in the pack that holds both, the shadows'
    raw outputs are their released ones; the packs of shadows alone are the plain undefended bank's."""
    d = tiny_spec_dict(tmp_path, attacks=[{"name": "lira_offline"}], bank={"engine": "local", "pack_size": 4},
                       tracking={"enabled": False}, attacker="non_adaptive",
                       plan={"num_models": 8, "population": 300, "targets": [0]},
                       defense={"name": "hamp", "params": {"output_modification": True}},
                       metrics={"raw_outputs": True})
    res = run_audit(AuditSpec.model_validate(d), console=False)
    released, raw = read_signals(res), read_signals(res, raw=True)
    np.testing.assert_array_equal(raw.logits[1:], released.logits[1:])
    assert not np.allclose(raw.logits[0], released.logits[0])
    store = SignalStore(res.spec.output_dir, res.fingerprint, 4, 8, res.spec.pack_fingerprints())
    assert store.fingerprint_of(1) == AuditSpec.model_validate({**d, "defense": {}, "attacker": "adaptive",
                                                               "metrics": {}}).fingerprint()
    assert "raw_logits" in store.read_pack(0) and "raw_logits" not in store.read_pack(1)
    # (against undefended shadows the raw outputs of a HAMP-trained target are no easier: AUC 0.56 and 0.55)
    assert res.raw_attacks["lira_offline"]["auc"] != res.attacks["lira_offline"]["auc"]
