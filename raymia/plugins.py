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

Beside registered names, a spec may name a plug-in by import path, `module:function` (uvicorn's form;
`import_object`): the module is imported from the installed packages or the current directory, and the
bank's fingerprint covers the bytes of the file that defines it (`source_digest`), so editing it retrains.

This module imports nothing of raymia but `errors`: the registries use it, and it uses no registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from raymia.errors import RaymiaError, SpecError

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


IMPORT_PATH = "module:function"  # how docs and errors spell the form


def is_import_path(name: str) -> bool:
    """Whether a registry name is an import path `module:attribute` rather than a registered name."""
    return ":" in name


def _split_import_path(path: str, where: str) -> tuple[str, str]:
    module, _, attr = path.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not module or not attr or not all(p.isidentifier() for p in parts):
        raise SpecError(f"{path!r} is not an import path; expected {IMPORT_PATH}, e.g. my_models:build",
                          where=where)
    return module, attr


def _with_cwd_on_path() -> None:
    # After the installed packages, so a file in the current directory cannot shadow one of them.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


# module -> SHA-256 of the source file it was imported (or last reloaded) from, by `import_object`
_IMPORTED: dict[str, str] = {}


def _current_module(module: str):
    """The module, imported, or reloaded when its source file has changed since it was imported: a notebook
    that edits its model or attack file and audits again runs the edited code (which is what `source_digest`
    puts in the bank's fingerprint), not the first version Python keeps in sys.modules. A module the caller
    imported before raymia first read it is reloaded when its file changed after this process started:
    nothing records which version that import read."""
    imported_before = module not in _IMPORTED and module in sys.modules
    mod = importlib.import_module(module)
    origin = getattr(mod, "__file__", None)
    if origin and os.path.isfile(origin):
        with open(origin, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        known = _IMPORTED.get(module)
        stale = known != digest if known is not None else imported_before and _edited_since_start(origin)
        if stale:
            # its bytecode cache is checked by the source's mtime in whole seconds and its size: an edit within
            # the second that kept the size would reload the old code
            with contextlib.suppress(OSError, TypeError):
                os.remove(mod.__cached__)
            mod = importlib.reload(mod)
        _IMPORTED[module] = digest
    return mod


def _edited_since_start(path: str) -> bool:
    """Whether the file was written after this process started (so perhaps after an import read it). The
    start is read from Linux's /proc; elsewhere every file counts as edited (a reload too many is harmless)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name's ")"
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return os.path.getmtime(path) >= started - 1  # btime is in whole seconds


def import_object(path: str, where: str) -> Any:
    """The object an import path `module:attribute` names, its module imported from the installed packages
    or the current directory (where a Ray worker of a local cluster runs too; on other nodes the module
    must be installed). Every failure is one SpecError naming `where`."""
    module, attr = _split_import_path(path, where)
    _with_cwd_on_path()
    try:
        mod = _current_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise SpecError(f"cannot import {module!r}: no such module in the installed packages or the "
                              f"current directory ({os.getcwd()})", where=where) from None
        raise SpecError(f"importing {module!r} failed: {type(e).__name__}: {e}", where=where) from e
    except Exception as e:  # any failure of the user's module: one line naming it
        raise SpecError(f"importing {module!r} failed: {type(e).__name__}: {e}", where=where) from e
    obj: Any = mod
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise SpecError(f"module {module!r} has no attribute {attr!r}", where=where)
        obj = getattr(obj, name)
    if not callable(obj):
        raise SpecError(f"{path!r} is a {type(obj).__name__}, not a function or class", where=where)
    return obj


def source_digest(path: str, where: str) -> str:
    """SHA-256 (16 hex digits) of the source file of an import path's module, found without importing it:
    what ties stored results to the user's code."""
    module, _ = _split_import_path(path, where)
    _with_cwd_on_path()
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not os.path.isfile(found.origin):
        raise SpecError(f"cannot import {module!r}: no such module in the installed packages or the current "
                          f"directory ({os.getcwd()})", where=where)
    with open(found.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
