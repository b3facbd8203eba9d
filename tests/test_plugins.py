"""Plug-in discovery (raymia.plugins): a registry imports its package's modules the first time it is read,
skipping private ones; third-party plug-ins load from their entry points, and one that fails says which."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raymia.errors import RaymiaError
from raymia.plugins import ENTRY_POINT_GROUP, PluginError, import_submodules
from raymia.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def demo_package(tmp_path, monkeypatch):
    """A package `rm_demo_pkg` with a registry of its own and modules that register in it."""
    _write(tmp_path / "rm_demo_pkg" / "__init__.py", """
        from raymia.registry import Registry
        THINGS = Registry("thing", package="rm_demo_pkg")
    """)
    for mod, name in (("alpha.py", "a"), ("_private.py", "hidden"), ("sub/beta.py", "b"), ("_sub/gamma.py", "g")):
        _write(tmp_path / "rm_demo_pkg" / mod, f"""
            from rm_demo_pkg import THINGS
            @THINGS.register({name!r})
            def thing():
                "A thing."
        """)
    _write(tmp_path / "rm_demo_pkg" / "sub" / "__init__.py", "")
    _write(tmp_path / "rm_demo_pkg" / "_sub" / "__init__.py", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for m in [m for m in sys.modules if m == "rm_demo_pkg" or m.startswith("rm_demo_pkg.")]:
        del sys.modules[m]


def test_a_registry_finds_its_modules_when_first_read(demo_package):
    import rm_demo_pkg

    assert "rm_demo_pkg.alpha" not in sys.modules  # importing the package imports no plug-in
    assert rm_demo_pkg.THINGS.names() == ["a", "b"]  # sub-packages too; `_private` and `_sub` skipped
    assert {"rm_demo_pkg.alpha", "rm_demo_pkg.sub", "rm_demo_pkg.sub.beta"} <= set(sys.modules)
    assert "rm_demo_pkg._private" not in sys.modules and "rm_demo_pkg._sub" not in sys.modules
    assert rm_demo_pkg.THINGS.get("a").doc == "A thing."
    assert import_submodules("rm_demo_pkg") == ["rm_demo_pkg.alpha", "rm_demo_pkg.sub", "rm_demo_pkg.sub.beta"]


def test_a_name_registered_twice_names_both_modules():
    reg: Registry = Registry("widget")
    reg.register("w")(test_a_name_registered_twice_names_both_modules)
    with pytest.raises(PluginError, match=re.escape(f"widget 'w' is registered twice, by {__name__} and by "
                                                    "raymia.registry; give one of them another name")):
        reg.register("w")(Registry)
    assert issubclass(PluginError, RaymiaError)  # the CLI prints it as one line


def test_an_entry_defined_again_by_the_same_code_replaces_itself():
    """A notebook cell (or a script, or a reloaded module) that registers an attack, run again after an edit,
    replaces its entry: same module, same qualified name. Another function under that name is still refused."""
    reg: Registry = Registry("widget")
    for version in (1, 2):
        @reg.register("w")
        def widget(v=version):
            """A widget."""
            return v

    assert reg.get("w").obj is widget and reg.get("w").obj() == 2

    def other():
        """Another widget."""

    with pytest.raises(PluginError, match=f"widget 'w' is registered twice, by {__name__} and by {__name__}"):
        reg.register("w")(other)


def test_builtin_registries_need_no_list_of_modules():
    """Every module of the four plug-in packages registers something or is a helper; none is named in an
    __init__.py, and each registry still finds all of its built-in entries."""
    from raymia.attacks import ATTACKS
    from raymia.data import DATASETS
    from raymia.defenses import DEFENSES
    from raymia.models import MODELS

    for pkg in ("attacks", "data", "defenses", "models"):
        init = (ROOT / "raymia" / pkg / "__init__.py").read_text()
        assert "import_module" not in init and not [ln for ln in init.splitlines()
                                                     if ln.startswith("from raymia") and "registry" not in ln
                                                     and "base" not in ln], pkg
    assert {"loss", "lira_online", "rmia_offline", "shokri", "label_only"} <= set(ATTACKS.names())
    assert {"digits", "cifar10", "mnist", "purchase100", "npz", "synthetic"} <= set(DATASETS.names())
    assert {"none", "hamp", "dpsgd", "advreg", "memguard", "tl_dmi", "vae_metric_privacy"} <= set(DEFENSES.names())
    assert {"mlp", "lenet5", "airbench", "resnet18", "wrn", "mobilenetv2"} <= set(MODELS.names())


READ_REGISTRY = "from raymia.attacks import ATTACKS; print(len(ATTACKS.names()))"


def _with_plugin(tmp_path: Path, dist: str, module: str, code: str) -> subprocess.CompletedProcess:
    """Run `raymia list attacks` with a distribution `dist` whose entry point `plug` names `module`."""
    site = tmp_path / "site"
    _write(site / f"{module}.py", code)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    _write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    _write(info / "entry_points.txt", f"[{ENTRY_POINT_GROUP}]\nplug = {module}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "raymia", "list", "attacks"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)


def test_a_failing_plugin_is_one_line_naming_its_entry_point(tmp_path):
    out = _with_plugin(tmp_path, "rm-broken-plugin", "rm_broken_plugin", "import rm_not_installed_dependency\n")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "raymia: error: plug-in entry point plug = rm_broken_plugin (group raymia.plugins, from rm-broken-plugin "
        "0.1): failed to load: ModuleNotFoundError: No module named 'rm_not_installed_dependency'")
    assert out.stdout == ""


def test_a_plugin_that_takes_a_builtin_name_is_refused(tmp_path):
    code = """
        from raymia.attacks import ATTACKS
        @ATTACKS.register("loss")
        def loss(signals, target, p):
            "Not the loss attack."
    """
    out = _with_plugin(tmp_path, "rm-clash-plugin", "rm_clash_plugin", code)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "raymia: error: plug-in entry point plug = rm_clash_plugin (group raymia.plugins, from rm-clash-plugin "
        "0.1): failed to load: PluginError: attack 'loss' is registered twice, by raymia.attacks.mia.threshold "
        "and by rm_clash_plugin; give one of them another name")


RAY_WORKER_READS = """
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # its own instance

@ray.remote
def names():
    from raymia.attacks import ATTACKS  # a fresh worker process: discovery runs there
    import os
    return os.getpid(), ATTACKS.names()

pid, found = ray.get(names.remote())
assert pid != os.getpid()
print("worker sees:", "max_top2" in found)
ray.shutdown()
"""


@pytest.mark.slow
def test_a_plugin_reaches_the_ray_workers(tmp_path):
    """An installed plug-in is found by a Ray worker process, which reads the registry afresh (as a bank
    worker does when it rebuilds the spec's names)."""
    code = """
        import numpy as np
        from raymia.attacks import ATTACKS
        @ATTACKS.register("max_top2")
        def max_top2(signals, target, p):
            "Top-2 margin of the target's logits."
            z = np.sort(signals.logits[target, 0].astype(np.float64), axis=-1)
            return z[:, -1] - z[:, -2]
    """
    site = tmp_path / "site"
    _write(site / "rm_ray_plugin.py", code)
    info = site / "rm_ray_plugin-0.1.dist-info"
    _write(info / "METADATA", "Metadata-Version: 2.1\nName: rm-ray-plugin\nVersion: 0.1\n")
    _write(info / "entry_points.txt", f"[{ENTRY_POINT_GROUP}]\nplug = rm_ray_plugin\n")
    _write(tmp_path / "drive.py", "import os\n" + RAY_WORKER_READS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(tmp_path / "drive.py")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "worker sees: True" in out.stdout
