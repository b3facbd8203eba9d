"""How raymia finds its plug-ins: every module of a registry's package, and third-party entry points.

A plug-in (a data set, a model, a defense, an attack) is one module that registers itself on import
(`@DATASETS.register(...)`, `@MODELS.register(...)`, `@DEFENSES.register(...)`, `@ATTACKS.register(...)`).
Nothing lists those modules: the first time a registry is used (a name looked up, `raymia list`), it
imports every public module of its package and sub-packages (`import_submodules`: names starting with `_`
are skipped), then every third-party plug-in (`load_entry_points`). Importing a package stays cheap
(`import raymia.data` imports no data set module, `import raymia.defenses` no defense), and a Ray worker,
which resolves the spec's names through the same registries, finds the same plug-ins.

Third-party plug-ins are modules named by an entry point of the group `raymia.plugins` in their
distribution's metadata (docs/extending.md):

    [project.entry-points."raymia.plugins"]
    my_attacks = "my_package.raymia_plugin"

Loading the entry point imports the module, which registers its entries. A plug-in that fails to load
raises one `PluginError` naming the entry point and its distribution.

This module imports nothing of raymia but `errors`: the registries use it, and it uses no registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import EntryPoint, entry_points

from raymia.errors import RaymiaError

ENTRY_POINT_GROUP = "raymia.plugins"


class PluginError(RaymiaError):
    """A third-party plug-in failed to load. `where` names the entry point and its distribution."""


def import_submodules(package: str) -> list[str]:
    """Import every public module under `package` (recursively through sub-packages, in name order);
    modules and packages whose name starts with `_` are skipped. Returns the names imported."""
    pkg = importlib.import_module(package)
    done: list[str] = []
    for info in pkgutil.iter_modules(getattr(pkg, "__path__", []), prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(info.name)
        done.append(info.name)
        if info.ispkg:
            done += import_submodules(info.name)
    return done


_loaded: set[tuple[str, str]] = set()  # (name, value) of the entry points already loaded in this process


def describe(ep: EntryPoint) -> str:
    """`name = value` of an entry point, with the distribution that declares it."""
    dist = getattr(ep, "dist", None)
    source = f", from {dist.name} {dist.version}" if dist is not None else ""
    return f"plug-in entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP}{source})"


def load_entry_points() -> list[str]:
    """Import the module of every entry point of the group `raymia.plugins` not loaded yet in this process;
    returns their names. A failure raises PluginError naming the entry point (and is retried next time)."""
    new = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        key = (ep.name, ep.value)
        if key in _loaded:
            continue
        try:
            ep.load()
        except Exception as e:  # any failure of third-party code: one line naming the plug-in
            raise PluginError(f"failed to load: {type(e).__name__}: {e}", where=describe(ep)) from e
        _loaded.add(key)
        new.append(ep.name)
    return new
