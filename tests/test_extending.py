"""docs/extending.md is true: its four plug-in files, copied into their packages, are found without editing
an __init__.py and audit together under the page's spec; its third-party plug-in, installed in a scratch
directory with the entry point of the page's pyproject.toml, shows in `raymia list` and passes `raymia check`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from raymia.plugins import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
IN_TREE = {"raymia/data/moons.py", "raymia/models/logreg.py", "raymia/defenses/input_noise.py",
           "raymia/attacks/mia/top_gap.py"}


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(DOC.read_text()) if kind == lang]


def _files() -> dict[str, str]:
    """The page's python blocks by the path on their first line (`# raymia/data/moons.py`)."""
    out = {}
    for body in _blocks("python"):
        first = body.splitlines()[0]
        assert re.fullmatch(r"# [\w/]+\.py", first), f"a python block must start with its file's path: {first!r}"
        out[first[2:]] = body
    return out


def _run(args: list[str], tmp_path: Path, pythonpath: list[Path], timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, ROOT])}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


AUDIT = """
import importlib, json, sys
from pathlib import Path

tmp = Path(sys.argv[1])
for folder in json.loads(sys.argv[2]):  # the plug-in files' folders join their packages' paths
    importlib.import_module(folder.replace("/", ".")).__path__.append(str(tmp / folder))

from raymia.attacks import ATTACKS
from raymia.audit import run_audit
from raymia.data import DATASETS
from raymia.defenses import DEFENSES
from raymia.models import MODELS
from raymia.resolve import load_spec

spec = load_spec(tmp / "spec.yaml")
entries = [DATASETS.get("moons"), MODELS.get("logreg"), DEFENSES.get("input_noise"), ATTACKS.get("top_gap")]
undocumented = [e.name for e in entries if not e.doc or not all(f.description for f in e.params.model_fields.values())]
res = run_audit(spec, output_dir=tmp / "out", console=False)
print(json.dumps({"undocumented": undocumented, "modules": sorted(m for m in sys.modules if m.endswith(
    ("moons", "logreg", "input_noise", "top_gap"))), "attacks": res.attacks, "utility": res.utility}))
"""


def test_the_four_examples_are_one_file_each_and_audit_together(tmp_path):
    files = _files()
    assert IN_TREE <= set(files)
    for path in IN_TREE:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(files[path])
        assert not (ROOT / path).exists(), f"{path} is an example of docs/extending.md, not part of raymia"
    (specs,) = _blocks("yaml")
    (tmp_path / "spec.yaml").write_text(specs)
    folders = sorted({str(Path(p).parent) for p in IN_TREE})
    out = _run([sys.executable, "-c", AUDIT, str(tmp_path), json.dumps(folders)], tmp_path, [])
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["undocumented"] == []
    assert res["modules"] == ["raymia.attacks.mia.top_gap", "raymia.data.moons", "raymia.defenses.input_noise",
                              "raymia.models.logreg"]
    assert set(res["attacks"]) == {"top_gap", "loss"}
    assert 0.0 <= res["attacks"]["top_gap"]["auc"] <= 1.0
    assert res["utility"]["test_accuracy"] > 0.6  # two moons, logistic regression, 3 epochs: better than chance


def _install(site: Path, dist: str, version: str, module: str, code: str, eps: dict[str, str]) -> None:
    """A distribution as pip leaves it: the module, and its dist-info with METADATA and entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{k} = {v}" for k, v in eps.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_third_party_plugin_from_its_entry_point(tmp_path):
    (toml,) = _blocks("toml")
    project = tomllib.loads(toml)["project"]
    eps = project["entry-points"][ENTRY_POINT_GROUP]  # the page declares the group raymia reads
    module = next(iter(eps.values()))
    code = _files()[f"{module}.py"]
    site = tmp_path / "site"
    _install(site, project["name"], project["version"], module, code, eps)

    listed = _run([sys.executable, "-m", "raymia", "list"], tmp_path, [site])
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "attack logit_margin" in listed.stdout and "defense confidence_penalty" in listed.stdout
    assert "attack loss" in listed.stdout  # the built-in ones stay

    spec = tmp_path / "spec.yaml"
    spec.write_text("data: digits\nmodel: {name: mlp, params: {hidden: [16]}}\n"
                    "defense: {name: confidence_penalty, params: {beta: 0.2}}\nattacks: [logit_margin, loss]\n"
                    "plan: {num_models: 4, population: 200}\ntracking: {enabled: false}\n")
    checked = _run([sys.executable, "-m", "raymia", "check", str(spec), "--output-dir", str(tmp_path / "out")],
                   tmp_path, [site])
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "confidence_penalty" in checked.stdout and "logit_margin" in checked.stdout

    bad = _run([sys.executable, "-m", "raymia", "check", str(spec), "--set", "defense.params.gamma=1"],
               tmp_path, [site])
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"raymia: error: {spec}: defense.params: gamma: unknown parameter of "
                                  "'confidence_penalty'; accepted: beta")
