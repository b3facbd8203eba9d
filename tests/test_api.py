"""The Python API (`raymia.run_audit`, `read_signals`, `run_attack`, `attack_metrics`, `spec_schema`): the same
audit as the CLI from a dict, its stored signals read back, an attack re-run on them with the audit's own
numbers, and the JSON Schema that editors read, checked against every spec in sweeps/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import raymia
from tests.conftest import ANSI, terminal_bars

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path) -> dict:
    return {"name": "api", "plan": {"num_models": 4, "population": 200}, "model": {"params": {"hidden": [64]}},
            "attacks": [{"name": "loss"}, {"name": "lira_offline"}], "bank": {"engine": "local", "pack_size": 4},
            "output_dir": str(tmp_path / "runs")}


def test_audit_from_a_dict_then_any_attack_on_its_stored_signals(tmp_path):
    d = _spec(tmp_path)
    result = raymia.run_audit(d, ["train.epochs=8", "tracking.enabled=false"])
    assert d["bank"] == {"engine": "local", "pack_size": 4} and "tracking" not in d  # the caller's dict is kept
    assert isinstance(result, raymia.AuditResult) and result.spec.train.epochs == 8
    signals = raymia.read_signals(result)
    assert isinstance(signals, raymia.Signals) and signals.keep.shape == (4, 200)
    assert result.targets == [0, 1, 2, 3]  # every model by default, each with the others but its pair as shadows
    again = [raymia.attack_metrics(raymia.run_attack("loss", None, signals, t), signals.keep[t])["auc"]
             for t in result.targets]
    assert np.mean(again) == pytest.approx(result.attacks["loss"]["auc"], abs=1e-12)  # the audit's own number
    assert np.std(again) == pytest.approx(result.attacks_std["loss"]["auc"], abs=1e-12)
    # the same bank from the spec alone (a YAML file here): read, not trained
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump({**d, "train": {"epochs": 8}}))
    assert (raymia.read_signals(path).logits == signals.logits).all()
    # and from the audit's report, its folder or its result.json (whose JSON was read as a spec before)
    for where in (result.out_dir, result.out_dir / "result.json", str(result.out_dir)):
        assert (raymia.read_signals(where).logits == signals.logits).all()


def test_an_audit_of_the_same_signals_with_other_attacks_says_it_replaces_the_report(tmp_path, caplog):
    import logging

    d = _spec(tmp_path)
    first = raymia.run_audit(d, ["train.epochs=2", "tracking.enabled=false"], console=False)
    with caplog.at_level(logging.WARNING, logger="raymia"):
        raymia.run_audit(d, ["train.epochs=2", "tracking.enabled=false"], console=False)  # the same: silent
        # the bank's engine and workers change no number: the stored signals are reused, and nothing is said
        again = raymia.run_audit(d, ["train.epochs=2", "tracking.enabled=false", "bank.engine=ray",
                                     "bank.num_workers=2"], console=False)
        assert again.reused_signals and again.attacks == first.attacks
        assert not caplog.records
        other = raymia.run_audit(d, ["train.epochs=2", "tracking.enabled=false", "attacks=[loss]"], console=False)
        # a sweep's spec object audits its base setting, as its dict does: an audit's report, nothing replaced
        swept = raymia.as_spec({**d, "attacks": ["loss"], "sweep": {"num_trials": 3}},
                               ["train.epochs=2", "tracking.enabled=false"], kind=raymia.SweepSpec)
        base = raymia.run_audit(swept, console=False)
        assert type(base.spec) is raymia.AuditSpec and base.spec.model_dump() == {
            k: v for k, v in swept.model_dump().items() if k != "sweep"}
    assert "`raymia audit spec.yaml` runs it again" in (base.out_dir / "spec.yaml").read_text()
    assert other.out_dir == first.out_dir and set(json.loads((other.out_dir / "result.json").read_text())["attacks"]) == {"loss"}
    (record,) = caplog.records
    assert record.getMessage() == (f"{first.out_dir} held the report of an audit of these signals with other attacks; "
                                   "it is replaced (its MLflow run, if tracked, keeps it)")



def test_signals_logged_to_mlflow_are_read_back_elsewhere(tmp_path):
    """`tracking.log_signals`: the audit's run holds its bank's packs and manifests under signals/; downloaded
    into another folder they are the same signals, read by `read_signals` without the original store (and
    without training). Off by default: a run without it holds no signals."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    d = {**_spec(tmp_path), "train": {"epochs": 4},
         "tracking": {"uri": uri, "experiment": "raymia-tests", "log_signals": True}}
    result = raymia.run_audit(d, console=False)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("raymia-tests").experiment_id])
    names = {a.path for a in client.list_artifacts(run.info.run_id, f"signals/{result.fingerprint}")}
    assert {f"signals/{result.fingerprint}/k4-pack-00000.npz", f"signals/{result.fingerprint}/k4-pack-00000.json"} <= names
    elsewhere = tmp_path / "elsewhere"
    client.download_artifacts(run.info.run_id, "signals", str(elsewhere))
    again, original = raymia.read_signals(result.spec, output_dir=elsewhere), raymia.read_signals(result)
    assert (again.logits == original.logits).all() and (again.keep == original.keep).all()
    import mlflow

    mlflow.set_tracking_uri(mine := f"sqlite:///{tmp_path}/mine.db")  # the caller's own MLflow
    try:
        plain = raymia.run_audit({**d, "name": "plain", "tracking": {"uri": uri, "experiment": "other"}}, console=False)
        assert mlflow.get_tracking_uri() == mine  # raymia logs through a client of its own
    finally:
        mlflow.set_tracking_uri(None)
    [run] = client.search_runs([client.get_experiment_by_name("other").experiment_id])
    assert plain.reused_signals and not client.list_artifacts(run.info.run_id, "signals")

def test_a_local_audit_leaves_the_callers_torch_as_it_was(tmp_path):
    """bank.engine: local trains in the caller's process: its torch thread count (set to the bank's
    cpus_per_worker while training) and its global random state (seeded per model) are the caller's again
    once the audit returns; a notebook's later work was left on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    torch.manual_seed(123)
    try:
        raymia.run_audit(_spec(tmp_path), ["train.epochs=1", "tracking.enabled=false"], console=False)
        assert torch.get_num_threads() == 3
        after = torch.rand(4)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(4))
    finally:
        torch.set_num_threads(before)


def test_read_signals_of_a_non_adaptive_audit_give_its_shadow_pool(tmp_path):
    """attacker: non_adaptive, two defended targets: the audit's shadows are the undefended models only, and
    the signals `read_signals` gives back carry that pool, so an attack re-run on them scores each target
    exactly as the audit did (with every model as a shadow, target 0 would have the defended target 2 among
    its shadows)."""
    d = {**_spec(tmp_path), "plan": {"num_models": 6, "population": 200, "targets": [0, 2]},
         "attacks": ["lira_offline", {"name": "rmia_offline", "params": {"a": 0.3}}], "attacker": "non_adaptive",
         "defense": {"name": "confidence", "params": {"temperature": 3.0}}, "bank": {"engine": "local", "pack_size": 2}}
    result = raymia.run_audit(d, ["train.epochs=3", "tracking.enabled=false"], console=False)
    signals = raymia.read_signals(result)
    assert signals.shadow_pool.tolist() == [False, True, False, True, True, True]
    for i, t in enumerate(result.targets):
        for name, params in (("lira_offline", None), ("rmia_offline", {"a": 0.3})):
            scores = raymia.run_attack(name, params, signals, t)
            assert (scores == result.points.scores[name][i]).all()
            assert raymia.full_metrics(scores, signals.keep[t]) == result.per_target[name][i]


def test_a_sweep_from_python_and_its_result(tmp_path, ray_local):
    """run_sweep from a dict: its SweepResult (the baseline and the searched trials, each with its audit's
    flat metrics, the front as trial numbers), the same result again from a second call without running
    anything; the caller's Optuna verbosity is its own afterwards."""
    import optuna

    d = {**_spec(tmp_path), "bank": {"pack_size": 4}, "tracking": {"enabled": False},
         "sweep": {"defense": "confidence", "num_trials": 1, "objectives": [
             {"metric": "test_accuracy", "mode": "max"}, {"metric": "loss/auc", "mode": "min"}]}}
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with terminal_bars() as (screen, _):  # as `raymia sweep` draws them on a terminal
            result = raymia.run_sweep(d, ["train.epochs=2"], console=False)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    shown = ANSI.sub("", screen.getvalue())
    assert re.search(r"\[raymia\] sweep api: trials .* 1/1", shown), shown  # Tune's callback counts the trials
    assert re.search(r"\[raymia\] trial 0: bank packs .* 1/1", shown)  # the baseline's, on this process's pool
    assert "[raymia] trial 1 done (1/1)" in shown  # the lines printed above the bars
    assert isinstance(result, raymia.SweepResult)
    assert [(t["trial"], t["defense"], t["status"]) for t in result.trials] == [(0, "none", "ok"), (1, "confidence", "ok")]
    baseline = json.loads((Path(result.trials[0]["audit_dir"]) / "result.json").read_text())
    assert result.trials[0]["loss/auc"] == baseline["attacks"]["loss"]["auc"]
    assert result.front_trials == [result.trials[i]["trial"] for i in result.front] and result.front_trials
    again = raymia.run_sweep(d, ["train.epochs=2"], console=False)
    assert again.trials == result.trials and again.front == result.front
    _sweep_as_a_notebook_shows_it(result)


def _sweep_as_a_notebook_shows_it(result) -> None:
    """A few lines (the front's settings with the objectives' values, the folder), report.html's front table
    and pareto.png inline, the trials as a DataFrame with the trials' own values."""
    import base64
    import dataclasses
    import math
    import re

    text = repr(result)
    lines = text.splitlines()
    assert str(result) == text and len(text) < 1000 and "spec=" not in text
    assert lines[0] == "SweepResult api: 2 trials, 2 ok; objectives test_accuracy (max), loss/auc (min)"
    for t in (result.trials[i] for i in result.front):
        setting = "-" if t["defense"] == "none" else ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                                 for k, v in t["params"].items())
        assert (f"    trial {t['trial']}: {t['defense']} {setting}  test_accuracy={t['test_accuracy']:.4f}  "
                f"loss/auc={t['loss/auc']:.4f}") in lines
    assert lines[-1] == f"  report: {result.out_dir}" and lines[-2].startswith("  hypervolume vs the undefended trial")
    html = result._repr_html_()
    page = (result.out_dir / "report.html").read_text()
    front = re.findall(r"<table>.*?</table>", html)
    assert len(front) == 1 and front[0] in page
    assert len(re.findall(r"<tr><td>", front[0])) == len(result.front)
    png = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert [base64.b64decode(b) for b in png] == [(result.out_dir / "pareto.png").read_bytes()]
    odd = dataclasses.replace(result, spec=result.spec.model_copy(update={"name": "<script>x</script>"}))
    assert "<script>" not in odd._repr_html_() and "&lt;script&gt;x&lt;/script&gt;" in odd._repr_html_()
    table = result.table()
    assert list(table.index) == [0, 1] and table.index.name == "trial"
    # confidence's top_k first: the temperature and rounding act only beside a top_k other than 1
    assert list(table.columns[:9]) == ["defense", "params.top_k", "params.temperature", "params.decimals", "status",
                                       "front", "test_accuracy", "loss/auc", "std/test_accuracy"]
    assert list(table["front"]) == [n in result.front_trials for n in (0, 1)]
    for t in result.trials:
        for k, v in [*t.items(), *((f"params.{k}", v) for k, v in t["params"].items())]:
            if k not in ("trial", "params"):
                got = table.loc[t["trial"], k]
                assert got == v or (v is None and (got is None or math.isnan(got))), (t["trial"], k)
    assert math.isnan(table.loc[0, "params.temperature"])  # the baseline has no setting


def test_api_errors_name_the_field_or_what_is_missing(tmp_path):
    d = _spec(tmp_path)
    with pytest.raises(raymia.SpecError, match=r"^plan.num_modles: unknown field"):
        raymia.run_audit({**d, "plan": {"num_modles": 4}})
    with pytest.raises(raymia.SpecError, match=r"^model.name: .*'mpl'"):
        raymia.as_spec({**d, "model": {"name": "mpl"}})
    with pytest.raises(raymia.RaymiaError, match=r"lack packs \[0\]; run the audit first"):
        raymia.read_signals(d)  # never trained
    # a spec object is checked as a dict is: its registry names and params before any training
    typo = raymia.AuditSpec.model_validate({**d, "attacks": ["loss", "lira_ofline"]})
    with pytest.raises(raymia.SpecError, match=r"^attacks.1.name: unknown attack 'lira_ofline'"):
        raymia.run_audit(typo, track=False, console=False)
    auto = raymia.AuditSpec.model_validate({**d, "attacks": [{"name": "rmia_offline", "params": {"a": "auto"}}]})
    with pytest.raises(raymia.SpecError, match=r"^attacks.0.params: a='auto' tunes a on a shadow model"):
        raymia.as_spec(auto)
    assert not (tmp_path / "runs" / "signals").exists()  # nothing trained
    # the kind of spec by class or by name; another is one line
    assert type(raymia.as_spec({"sweep": {"defense": "hamp"}}, kind="sweep")) is raymia.SweepSpec
    assert raymia.spec_schema("audit") == raymia.spec_schema(raymia.AuditSpec) != raymia.spec_schema()
    with pytest.raises(raymia.SpecError, match=r"^kind: 'sweeps' is no kind of spec; accepted: AuditSpec, SweepSpec"):
        raymia.as_spec(d, kind="sweeps")


def test_an_entry_registered_in_the_session_is_refused_where_ray_workers_would_need_it(tmp_path):
    """A model (or data set, defense) registered in the notebook's own `__main__` cannot reach Ray's workers,
    which said only "unknown model" after Ray had started: refused before, saying to train locally. With
    bank.engine: local it trains. A sweep's trials run in Ray's processes: there an attack is refused too."""
    from torch import nn

    from raymia.attacks import ATTACKS
    from raymia.models.base import MODELS
    from raymia.registry import Params

    def session_net(p, info):
        """A model of the notebook's."""
        return nn.Sequential(nn.Flatten(), nn.Linear(64, info.num_classes))

    def session_attack(signals, target, p):
        """An attack of the notebook's."""
        return -signals.logits[target, 0].max(-1)

    session_net.__module__ = session_attack.__module__ = "__main__"
    MODELS.register("session_net", Params)(session_net)
    ATTACKS.register("session_attack", Params)(session_attack)
    try:
        d = {**_spec(tmp_path), "model": "session_net", "attacks": ["loss", "session_attack"],
             "bank": {"engine": "ray"}, "tracking": {"enabled": False}, "train": {"epochs": 1}}
        with pytest.raises(raymia.RaymiaError, match=r"^model.name: model 'session_net' is registered in this "
                                                     r"session \(__main__\), .* use bank.engine: local"):
            raymia.run_audit(d, console=False)
        assert not (tmp_path / "runs" / "signals").exists()
        local = raymia.run_audit(d, ["bank.engine=local"], console=False)
        assert set(local.attacks) == {"loss", "session_attack"}
        sweep = {**d, "model": "mlp", "sweep": {"defense": "confidence", "num_trials": 1}}
        with pytest.raises(raymia.RaymiaError, match=r"^attacks.1.name: attack 'session_attack' is registered in "
                                                     r"this session .* a sweep's trials run in Ray's processes"):
            raymia.run_sweep(sweep, console=False)
    finally:
        MODELS._entries.pop("session_net")
        ATTACKS._entries.pop("session_attack")


def test_help_on_the_api_says_what_each_name_takes_and_gives():
    """help() on each exported name: the result classes document their fields, the spec classes are not
    described by pydantic's base-class text, and the functions say what they return."""
    for name in ("per_target", "attacks_std", "utility", "points", "targets", "full_metrics"):
        assert name in raymia.AuditResult.__doc__, name
    for name in ("trials", "front", "front_trials", "hypervolume", "status"):
        assert name in raymia.SweepResult.__doc__, name
    for cls in (raymia.AuditSpec, raymia.SweepSpec):
        assert "spec" in cls.__doc__ and "pydantic" not in cls.__doc__.lower()
    assert "returns its `AuditResult`" in raymia.run_audit.__doc__
    assert "returns its `SweepResult`" in raymia.run_sweep.__doc__
    assert "float64 [signals.num_points]" in raymia.run_attack.__doc__


def test_run_attack_says_what_is_wrong_with_its_arguments():
    """A target that is no model index (a float, a string, out of range), signals that are not Signals and
    a name that is not a string are one line each saying what run_attack takes, not numpy's IndexError or a
    TypeError from deep inside an attack."""
    import numpy as np

    rng = np.random.default_rng(0)
    keep = np.zeros((4, 10), dtype=bool)
    keep[0::2, :5] = keep[1::2, 5:] = True
    signals = raymia.Signals(logits=rng.normal(size=(4, 1, 10, 3)).astype(np.float32),
                             labels=rng.integers(0, 3, 10), keep=keep)
    assert raymia.run_attack("lira_offline", None, signals, np.int64(2)).shape == (10,)
    for target in (1.0, "0", 4, -1, True):
        with pytest.raises(ValueError, match=r"^target must be a model index, an int in \[0, 4\), got "):
            raymia.run_attack("lira_offline", None, signals, target)
    with pytest.raises(TypeError, match=r"^signals must be a raymia.Signals \(raymia.read_signals gives one\), got dict"):
        raymia.run_attack("loss", None, {"logits": signals.logits}, 0)
    with pytest.raises(raymia.SpecError, match=r"^attack.name: an attack's name is a string, got AttackSpec"):
        raymia.run_attack(raymia.as_spec({"attacks": ["loss"]}).attacks[0], None, signals, 0)


def test_signals_print_as_their_shapes():
    """A notebook that echoes `raymia.read_signals(result)` sees the bank's shapes, not pages of arrays."""
    import dataclasses

    import numpy as np

    keep = np.zeros((4, 10), dtype=bool)
    keep[0::2, :5] = keep[1::2, 5:] = True
    signals = raymia.Signals(logits=np.zeros((4, 2, 10, 3), np.float32), labels=np.zeros(10, np.int64), keep=keep,
                             pop_logits=np.zeros((4, 2, 7, 3), np.float32), pop_labels=np.zeros(7, np.int64),
                             shadow_pool=np.array([False, True, True, True]))
    assert repr(signals) == "Signals(models=4, queries=2, points=10, classes=3, population=7, shadow_pool=3 models)"
    # compared and hashed as objects (numpy's "truth value of an array is ambiguous" before)
    twin = dataclasses.replace(signals)
    assert signals == signals and signals != twin and len({signals, signals, twin}) == 2


def test_spec_schema_accepts_every_shipped_spec_and_rejects_a_typo():
    jsonschema = pytest.importorskip("jsonschema")

    schema = raymia.spec_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert len(files) > 20
    examples = sorted((ROOT / "examples").rglob("*.yaml"))  # the audits examples/README.md runs
    assert len(examples) >= 3
    files += examples
    for f in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(f.read_text()))]
        assert not errors, (f.name, errors)
    bad = [e for e in validator.iter_errors({"plan": {"num_modles": 4}})]
    assert bad and "num_modles" in bad[0].message
    assert "sweep" not in raymia.spec_schema(raymia.AuditSpec)["properties"]


def test_schema_command_prints_the_schema(capsys):
    from raymia.cli import build_parser, cmd_schema

    assert cmd_schema(build_parser().parse_args(["schema"])) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == raymia.spec_schema() and "sweep" in printed["properties"]


def test_import_raymia_stays_light_and_leaves_the_environment_alone():
    """Every Ray worker imports raymia: the API is imported on first use, not with the package. Importing it
    changes no environment variable of the caller's session (Ray's, in particular)."""
    out = subprocess.run([sys.executable, "-c", "import os, sys; env = dict(os.environ); import raymia; "
                          "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'raymia.audit') if m in sys.modules)); "
                          "raymia.run_attack; print('raymia.attacks' in sys.modules); print(dict(os.environ) == env)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["[]", "True", "True"]


def test_rays_log_deduplication_lets_raymias_progress_lines_through_and_merges_the_rest(monkeypatch):
    """Worker lines that differ only in their numbers are merged by Ray's deduplicator; raymia's progress
    lines are exactly such lines, and each one must reach the console."""
    from ray._private import ray_logging

    from raymia.engine.cluster import _keep_progress_lines_whole

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)  # Ray's default, whatever this shell has

    _keep_progress_lines_whole()
    _keep_progress_lines_whole()  # once is enough: a second call adds nothing
    dedup = ray_logging.LogDeduplicator(10, ray_logging.stdout_deduplicator.allow_re.pattern, None,
                                        _timesource=lambda: 0.0)
    printed = []
    for pid in (1, 2, 3):
        lines = [f"[raymia] worker {pid}: pack {pid} done ({pid}/3)", f"Ray warning on worker {pid}"]
        for batch in dedup.deduplicate({"ip": "127.0.0.1", "pid": pid, "lines": lines}):
            printed += batch["lines"]
    assert [ln for ln in printed if ln.startswith("[raymia]")] == [f"[raymia] worker {p}: pack {p} done ({p}/3)"
                                                                    for p in (1, 2, 3)]
    assert [ln for ln in printed if ln.startswith("Ray warning")] == ["Ray warning on worker 1"]  # merged
    assert ray_logging.stdout_deduplicator.allow_re.pattern.count("raymia") == 1


LOCAL_BANK_LOGGING = """
import logging, sys
import raymia
spec = {"plan": {"num_models": 4, "population": 100}, "model": {"params": {"hidden": [16]}}, "attacks": ["loss"],
        "bank": {"engine": "local"}, "train": {"epochs": 1}, "tracking": {"enabled": False}}
raymia.run_audit(spec, output_dir="runs", console=False)
rlog = logging.getLogger("raymia")
print("after:", rlog.handlers, rlog.propagate, rlog.level)
logging.basicConfig(level=logging.INFO, format="mine: %(message)s", stream=sys.stdout)
raymia.run_audit(spec, ["seed=1"], output_dir="runs", console=False)
"""


def test_a_local_bank_prints_its_progress_then_leaves_the_raymia_logger_as_it_was(tmp_path):
    """A bare script's local bank prints its progress on stdout while it trains; afterwards the `raymia`
    logger is as it was, so logging the script configures later gets raymia's lines (they went to stdout
    through raymia's own handler for the rest of the session, whatever the script configured)."""
    out = subprocess.run([sys.executable, "-c", LOCAL_BANK_LOGGING], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, _, second = out.stdout.partition("after: [] True 0\n")
    assert "[raymia] worker 0: pack 0 done (1/1" in first and _, out.stdout
    assert "mine: worker 0: pack 0 done (1/1" in second and "[raymia]" not in second, out.stdout


RAY_AS_FOUND = """
import ray, raymia
spec = {"plan": {"num_models": 4, "population": 100}, "model": {"params": {"hidden": [16]}}, "attacks": ["loss"],
        "bank": {"num_workers": 1}, "train": {"epochs": 1}, "tracking": {"enabled": False}}
import os
before = {k: os.environ.get(k) for k in ("TUNE_GLOBAL_CHECKPOINT_S", "RAY_AIR_NEW_OUTPUT", "TUNE_PRINT_ALL_TRIAL_ERRORS")}
import signal
sigterm = signal.getsignal(signal.SIGTERM)
raymia.run_audit(spec, output_dir="runs", console=False)
print("after its own:", ray.is_initialized())
print("env as found:", before == {k: os.environ.get(k) for k in before}, before)
print("SIGTERM as found:", signal.getsignal(signal.SIGTERM) is sigterm)  # ray.init sets Ray's own
ray.init(address="local", num_cpus=1, include_dashboard=False)  # the notebook's own Ray: raymia uses it and leaves it
raymia.run_audit(spec, ["seed=1"], output_dir="runs", console=False)
print("after the caller's:", ray.is_initialized())
print("env as found again:", before == {k: os.environ.get(k) for k in before})
"""


@pytest.mark.slow
def test_an_audit_leaves_ray_as_it_found_it(tmp_path):
    """The Ray instance an audit starts for its bank is shut down when it returns (a notebook's own
    ray.init() afterwards failed: Ray was initialised already); the caller's own Ray is used and left up."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", RAY_AS_FOUND], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after its own: False" in out.stdout and "after the caller's: True" in out.stdout, out.stdout
    # the variables set for its Ray (Tune's reporter and checkpoint period) are gone with it
    assert "env as found: True {'TUNE_GLOBAL_CHECKPOINT_S': None" in out.stdout, out.stdout
    assert "env as found again: True" in out.stdout, out.stdout  # Tune's settings come and go with a call
    assert "SIGTERM as found: True" in out.stdout, out.stdout
    # a bare script sees the pool's progress (it configured no logging; training on Ray was silent)
    first, _, second = out.stdout.partition("after its own:")
    assert "[raymia] worker 0: pack 0 done (1/1" in first and "[raymia] worker 0: pack 0 done (1/1" in second, \
        out.stdout


KEEPS_LOGGING = """
import logging, signal, sys
logging.basicConfig(level=logging.INFO, format="mine: %(name)s %(message)s", stream=sys.stdout)
def mine(signum, frame):
    pass
signal.signal(signal.SIGTERM, mine)
from raymia.engine.cluster import ensure_ray
ensure_ray()
logging.getLogger("raymia").info("an info line")
logging.getLogger("raymia").warning("a warning")
root = logging.getLogger()
print(len(root.handlers), logging.getLevelName(root.level))
print("SIGTERM handler kept:", signal.getsignal(signal.SIGTERM) is mine)
"""


def test_starting_ray_leaves_the_callers_logging_as_it_was(tmp_path):
    """A notebook's logging (basicConfig at INFO) is what it was after raymia starts Ray for an audit: Ray's
    LoggingConfig, which raymia passes for the workers, would set the driver's root logger to WARNING and
    add a handler of its own, so that every warning printed twice and the INFO lines vanished. Its SIGTERM
    handler is its own too (ray.init sets Ray's, which exits at once after its core's report on stderr: the
    raymia command's clean stop on SIGTERM needs its handler kept)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", KEEPS_LOGGING], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-4:] == ["mine: raymia an info line", "mine: raymia a warning", "1 INFO",
                          "SIGTERM handler kept: True"], out.stdout
    assert "a warning" not in out.stderr and "job_id=" not in out.stdout


STOPPED_WHILE_RAY_STARTS = """
import os, signal, time
from pathlib import Path
got = []
def mine(signum, frame):  # as the raymia command's: the stop raised where the main thread is
    got.append(signum)
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, mine)
import ray, ray._private.services as services
real = services.get_node
during = set()
def stopped_here(*a, **k):  # the GCS and raylet are up, ray.init waits for its node: a SIGTERM lands
    during.update(_ray_descendants())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    return real(*a, **k)
services.get_node = stopped_here
from raymia.engine.cluster import _ray_descendants, ensure_ray
try:
    ensure_ray()
except KeyboardInterrupt:
    print("stopped by", got)
time.sleep(0.5)
def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
print("Ray's processes while it started:", len(during) >= 2)  # its GCS and raylet at least
print("Ray initialized:", ray.is_initialized(), "left:", sorted(p for p in during if alive(p)))
"""


def test_a_stop_while_ray_starts_is_the_callers_and_leaves_no_ray_process(tmp_path):
    """A SIGTERM while ray.init starts a local instance (a job stopped as it begins) reaches the process's own
    handler, not Ray's (which exited 15 and, for a process group's SIGTERM, after half a minute), and the
    processes that Ray had started (GCS, raylet, agents) do not outlive the start cut short."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", STOPPED_WHILE_RAY_STARTS], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["stopped by [15]", "Ray's processes while it started: True",
                                       "Ray initialized: False left: []"], \
        (out.stdout, out.stderr[-3000:])


def test_tune_settings_apply_on_a_ray_the_caller_started(ray_local, monkeypatch):
    """A sweep on the caller's own Ray (a notebook's ray.init) gets raymia's Tune settings too: the state
    saved after every event (what a resume reads), raymia's lines instead of Tune's reporter and tracebacks.
    They were set only when raymia started Ray itself; `caller.as_found` puts them back afterwards."""
    import os

    from raymia.engine.cluster import ensure_ray

    keys = ("TUNE_GLOBAL_CHECKPOINT_S", "RAY_AIR_NEW_OUTPUT", "TUNE_PRINT_ALL_TRIAL_ERRORS")
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    ensure_ray()
    assert [os.environ.get(k) for k in keys] == ["0", "0", "0"]


def test_only_the_outermost_call_puts_the_process_back(monkeypatch):
    """A sweep's baseline audit starts in a thread before the sweep sets Optuna's verbosity and Tune's
    settings, and ends while Tune still runs: put back at its end, they were undone mid-sweep (Optuna's
    INFO line per trial came back). Only the outermost call puts them back, when it returns."""
    import os

    import optuna

    from raymia.caller import as_found

    optuna.logging.set_verbosity(optuna.logging.INFO)
    monkeypatch.delenv("RAYMIA_TEST_SETTING", raising=False)

    def audit_beside_the_search():  # what the sweep sets while its baseline audit runs
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        os.environ["RAYMIA_TEST_SETTING"] = "1"

    @as_found
    def sweep():
        as_found(audit_beside_the_search)()
        return optuna.logging.get_verbosity(), os.environ.get("RAYMIA_TEST_SETTING")

    assert sweep() == (optuna.logging.WARNING, "1")  # the inner call undid neither
    assert optuna.logging.get_verbosity() == optuna.logging.INFO and "RAYMIA_TEST_SETTING" not in os.environ
