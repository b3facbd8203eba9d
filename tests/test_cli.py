"""The command line: one-line errors with exit code 2, and `raymia list`."""

from __future__ import annotations

import subprocess
import sys

import pytest


def raymia(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raymia", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.parametrize(
    ("content", "args", "needle"),
    [
        (None, [], "missing.yaml: file not found"),
        ("plan: [1, 2\n", [], "malformed YAML at line"),
        ("colour: red\n", [], "colour: unknown field"),
        ("data: {name: cifar1000}\n", [], "data.name: unknown data set 'cifar1000'; accepted:"),
        ("defense: {name: hamp, params: {alpha: -1}}\n", [], "defense.params: alpha"),
        ("plan: {num_models: 7}\n", [], "num_models must be even"),
        ("plan: {population: 5000}\n", [], "plan.population: 5000 exceeds the 1347 training points"),
        ("", ["--set", "train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
    ],
)
def test_bad_audit_input_is_one_line_exit_2(tmp_path, content, args, needle):
    path = tmp_path / "missing.yaml"
    if content is not None:
        path = tmp_path / "spec.yaml"
        path.write_text(content + f"output_dir: {tmp_path}/runs\ntracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n")
    out = raymia("audit", str(path), *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymia: error: "), out.stderr
    assert needle in lines[0]
    assert not (tmp_path / "runs" / "signals").exists()  # nothing started


def test_bad_sweep_objective(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sweep: {objectives: [{metric: test_accuracy, mode: max}, {metric: lira/auc, mode: min}]}\n"
                    f"tracking: {{enabled: false}}\noutput_dir: {tmp_path}/runs\n")
    out = raymia("sweep", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sweep.objectives.1.metric: unknown metric 'lira/auc'; accepted:" in out.stderr
    path.write_text(f"sweep: {{space: {{beta: {{low: 0, high: 1}}}}}}\noutput_dir: {tmp_path}/runs\n")
    out = raymia("sweep", str(path))
    assert out.returncode == 2 and "sweep.space.beta: 'hamp' has no parameter 'beta'" in out.stderr
    path.write_text(f"sweep: {{space: {{gamma: {{low: 0.5, high: 3}}}}}}\noutput_dir: {tmp_path}/runs\n")
    out = raymia("sweep", str(path))
    assert out.returncode == 2 and "sweep.space.gamma" in out.stderr and "gamma" in out.stderr


def test_list_shows_every_registry_with_parameters_and_defaults():
    out = raymia("list")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("dataset digits", "test_fraction", "0.25", "model mlp", "hidden", "[256, 256]",
                   "defense hamp", "gamma", "0.95", "[0.3, 0.99]", "log [0.0001, 0.05]", "defense none",
                   "attack lira_online", "fixed_variance", "attack loss", "query"):
        assert needle in text, needle
    assert "training functions: none registered" in text  # plug-ins add them; module:function needs none
    only = raymia("list", "attacks")
    assert "lira_offline" in only.stdout and "dataset digits" not in only.stdout
    for needle in ("inversion attack miface", "inversion attack gmi", "inversion attack plg_mi", "gan_steps"):
        assert needle in only.stdout, needle  # every attack, membership and inversion, with its params
    ood = raymia("list", "ood")
    assert "non-member set scaled" in ood.stdout and "non-member set gan" in ood.stdout
    inversion = raymia("list", "inversion")
    assert "inversion attack plg_mi" in inversion.stdout and "lira_offline" not in inversion.stdout
    bad = raymia("list", "widgets")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
