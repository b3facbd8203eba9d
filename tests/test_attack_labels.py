"""Attack labels: one attack listed twice with different params, each entry keyed by its label in results
and metric names (`<label>/auc`, `worst/...`); duplicate labels are one-line spec errors; specs without
labels dump, and fingerprint, exactly as before."""

from __future__ import annotations

import numpy as np
import pytest

from raymia.audit import run_audit
from raymia.errors import SpecError
from raymia.resolve import validate_spec
from raymia.spec import AuditSpec
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_LIRAS = [
    {"name": "lira_offline", "label": "lira_pp", "params": {"variance": "per_point"}},
    {"name": "lira_offline", "label": "lira_global", "params": {"variance": "global"}},
    "loss",
]


def test_duplicate_label_is_one_line_error() -> None:
    raw = {"attacks": ["loss", "lira_online", {"name": "lira_online", "params": {"variance": "global"}}]}
    with pytest.raises(SpecError) as e:
        validate_spec(raw)
    assert e.value.where == "attacks.2.label"
    assert str(e.value) == ("attacks.2.label: 'lira_online' already names attacks.1; give each entry its own "
                            "label (results and metrics are keyed by it)")
    assert "\n" not in str(e.value)
    raw = {"attacks": [{"name": "loss", "label": "x"}, {"name": "lira_online", "label": "x"}]}
    with pytest.raises(SpecError, match=r"^attacks\.1\.label: 'x' already names attacks\.0"):
        validate_spec(raw)
    raw = {"attacks": [{"name": "loss", "label": "lira_online"}, "lira_online"]}  # nor take another's name
    with pytest.raises(SpecError, match=r"^attacks\.1\.label: "):
        validate_spec(raw)


@pytest.mark.parametrize("label", ["worst", "defense", "std", "a/b", "", "two words"])
def test_bad_labels(label: str) -> None:
    with pytest.raises(SpecError, match=r"attacks\.0\.label"):
        validate_spec({"attacks": [{"name": "loss", "label": label}]})


def test_labels_leave_fingerprint_and_dumps_alone() -> None:
    plain = validate_spec({"attacks": ["loss", "lira_offline"]})
    labelled = validate_spec({"attacks": TWO_LIRAS})
    assert [a.key for a in plain.attacks] == ["loss", "lira_offline"]
    assert [a.key for a in labelled.attacks] == ["lira_pp", "lira_global", "loss"]
    assert plain.fingerprint() == labelled.fingerprint() == AuditSpec().fingerprint()
    assert plain.model_dump(mode="json")["attacks"] == [{"name": "loss", "params": {}},
                                                        {"name": "lira_offline", "params": {}}]
    dumped = labelled.model_dump(mode="json")["attacks"]
    assert dumped[0] == {"name": "lira_offline", "params": {"variance": "per_point"}, "label": "lira_pp"}
    assert validate_spec(labelled.model_dump(mode="json")) == labelled  # spec.yaml reads back the labels


def test_one_attack_twice_side_by_side_in_an_audit(tmp_path) -> None:
    d = tiny_spec_dict(tmp_path, attacks=TWO_LIRAS, tracking={"enabled": False},
                       queries=["identity"], plan={"num_models": 6, "population": 200, "targets": [0, 2]})
    d["bank"] = {"pack_size": 6, "engine": "local"}
    d["train"] = {"epochs": 20, "batch_size": 64, "lr": 0.002}
    result = run_audit(validate_spec(d), console=False)
    assert list(result.attacks) == ["lira_pp", "lira_global", "loss"]
    assert set(result.per_target) == set(result.roc) == {"lira_pp", "lira_global", "loss"}
    flat = result.flat_metrics()
    pp, glob = flat["lira_pp/auc"], flat["lira_global/auc"]
    assert pp is not None and glob is not None and pp != glob  # two settings, two results
    assert flat["worst/auc"] == max(pp, glob, flat["loss/auc"])
    assert "lira_offline/auc" not in flat
    assert np.isfinite(flat["std/lira_pp/auc"])
