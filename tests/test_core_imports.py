"""The compute core runs where Ray, MLflow and Optuna are not installed (a bare GPU machine)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

GUARD = """
import builtins
real = builtins.__import__
def guard(name, *a, **k):
    if name.split(".")[0] in ("ray", "mlflow", "optuna"):
        raise ImportError("blocked " + name)
    return real(name, *a, **k)
builtins.__import__ = guard
import torch
from raymia.spec import AuditSpec
from raymia.store import SignalStore
from raymia.engine.bank_job import build_bank_locally
from raymia.train.bank import BankContext
from raymia.audit import load_signals
from raymia.attacks import run_attack
from raymia.metrics import attack_metrics
import raymia.defenses, raymia.models, raymia.data
spec = AuditSpec.model_validate({"plan": {"num_models": 4, "population": 200}, "train": {"epochs": 2},
                                 "model": {"params": {"hidden": [16]}}, "bank": {"pack_size": 2}})
ctx = BankContext.from_spec(spec)
store = SignalStore(sys.argv[1], spec.fingerprint(), 2, 4)
build_bank_locally(spec, store, store.missing_packs())
sig = load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy())
print("auc", attack_metrics(run_attack("lira_online", None, sig, 0), sig.keep[0])["auc"])
"""


def test_core_runs_without_ray_mlflow_optuna(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys\n" + GUARD, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    auc = float(out.stdout.split("auc", 1)[1])
    assert 0.0 <= auc <= 1.0
    # Progress: one line per pack, with the time left while packs remain.
    lines = [ln for ln in out.stdout.splitlines() if "done (" in ln]
    assert len(lines) == 2 and "pack 0 done (1/2," in lines[0] and "left)" in lines[0]
    assert "pack 1 done (2/2," in lines[1] and "left" not in lines[1]


LEAN = """
import sys
import numpy as np
import raymia.sweep, raymia.audit, raymia.engine.pool, raymia.train.bank
from raymia.attacks import run_attack
from raymia.data import load_dataset
from raymia.metrics import full_metrics
from raymia.signals import Signals
load_dataset("digits")
rng = np.random.default_rng(0)
keep = rng.random((8, 100)) < 0.5
sig = Signals(logits=rng.normal(size=(8, 2, 100, 10)).astype(np.float32), labels=rng.integers(0, 10, 100), keep=keep,
              pop_logits=rng.normal(size=(8, 2, 50, 10)).astype(np.float32), pop_labels=rng.integers(0, 10, 50))
for attack in ("loss", "lira_online", "lira_offline", "rmia_online", "rmia_offline"):
    full_metrics(run_attack(attack, None, sig, 0), keep[0])
print(" ".join(m for m in ("sklearn", "scipy.stats", "scipy.optimize", "matplotlib", "pandas") if m in sys.modules))
"""


def test_quickstart_processes_import_no_heavy_libraries():
    """The raymia modules of a quickstart sweep's processes (driver, bank worker, trials) load digits and
    run the quickstart's attacks and their metrics without importing scikit-learn, scipy.stats, matplotlib
    or pandas, which would add 1 to 2 s to each process's start (benchmarks/RESULTS.md). Ray Tune itself
    still imports pandas in the trial processes; a sweep's figures import matplotlib when they are drawn."""
    out = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_duration_format():
    from raymia.report.text import duration as _duration

    assert [_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 7440)] == ["0s", "1m00s", "1m01s", "59m59s", "1h00m",
                                                                         "2h04m"]


# ----------------------------------------------------------------------------------------------- import graph
def _import_graph(root: Path) -> dict[str, set[str]]:
    """raymia's modules -> the raymia modules they import, at module level or inside functions (an import of
    a package's own parent package is not an edge: a package's face is not a cycle), as
    /work/shared/hooks/import_cycles.py reads them."""
    mods = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    root = Path(__file__).resolve().parents[1] / "raymia"
    graph = _import_graph(root)
    assert len(graph) > 60 and "raymia.defenses.dpsgd" in graph["raymia.defenses"] | {"raymia.defenses.dpsgd"}
    assert _cycles(graph) == []
    # the checker sees a circle, at module level or inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not graph["raymia.spec"] & {"raymia.attacks", "raymia.data", "raymia.defenses", "raymia.models"}


PLUGINS_LAZY = """
import sys
def loaded(prefix):
    return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
import raymia.spec
assert loaded("raymia.data") == loaded("raymia.models") == loaded("raymia.defenses") == [], "spec"
assert loaded("raymia.attacks") == loaded("raymia.train") == [], "spec"
import raymia.data, raymia.models
assert loaded("raymia.data") == ["raymia.data", "raymia.data.registry"], loaded("raymia.data")
assert loaded("raymia.models") == ["raymia.models", "raymia.models.base"], loaded("raymia.models")
from raymia.data import load_dataset
from raymia.models import build_model
build_model("cnn", None, load_dataset("digits").info)
assert loaded("raymia.defenses") == [], loaded("raymia.defenses")
assert "raymia.data.cifar" in sys.modules and "raymia.models.resnet" in sys.modules  # found when first read
assert "torchvision.models" not in sys.modules
import raymia.defenses, raymia.attacks
assert loaded("raymia.defenses") == ["raymia.defenses", "raymia.defenses.base"], loaded("raymia.defenses")
assert "raymia.attacks.mia.lira" not in sys.modules
print("ok")
"""


def test_plugin_packages_import_lazily_and_apart():
    """The spec schema imports no plug-in package; importing a plug-in package imports none of its plug-ins;
    loading a data set and building a model import no defense."""
    out = subprocess.run([sys.executable, "-c", PLUGINS_LAZY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
