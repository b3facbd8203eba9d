"""Name -> implementation registries with typed, documented parameters.

Every pluggable part (data set, model, defense, attack) registers here with a pydantic model of its
parameters. The registry validates a spec's `params` against that model, so an unknown or out-of-range
parameter is reported with its dotted field path, and `raymia list` prints every entry with its defaults.

A name may also be an import path, `module:function`: the user's own builder, training function or attack,
called as a registered one is, with its `params` passed through unchecked.

A parameter that is renamed keeps its old name working: the field declares it as its `validation_alias` (one
name, or `AliasChoices` of several), and `Params` accepts either spelling, refuses both in one block, lists the
old one beside the new (`raymia list`, `help()`), and hashes the parameter under its oldest name (`hashed`),
so the fingerprints, caches and sweep states written before the rename are found again.

A registry made with `package=` finds its entries itself (`raymia.plugins`): the first time it is read
(`get`, `names`, `entries`, `in`), it imports every public module of that package, then the third-party
plug-ins' entry points. Registering needs no reading, so a module registers while it is being discovered.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raymia.errors import SpecError, did_you_mean
from raymia.plugins import PluginError, import_object, import_submodules, is_import_path, load_entry_points
from raymia.space import ActsWhen  # kept with the search spaces, which carry it

T = TypeVar("T")

_DISCOVERY = threading.RLock()  # one for all registries: the modules of one may read another


def _takes_numbers(ann: Any) -> tuple[bool, bool]:
    """(whether a field of this annotation takes a number, whether its list elements are numbers), neither
    when it takes booleans too."""
    kinds = set(get_args(ann)) if get_origin(ann) is not list and get_args(ann) else {ann}
    if bool in kinds:
        return False, False
    elements = {get_args(e)[0] if get_origin(e) is Annotated else e
                for a in kinds if get_origin(a) is list for e in get_args(a)}
    return bool(kinds & {int, float}), bool(elements & {int, float})


_validating = threading.local()  # how deep this thread is in validating nested models


def validation_depth() -> int:
    """How many `ValidatedModel`s this thread is validating now (0: none)."""
    return getattr(_validating, "depth", 0)


class ValidatedModel(BaseModel):
    """The base of the spec's models and of every entry's `Params`:

    - a number field, or a list of numbers, refuses `true` and `false`: pydantic reads them as 1 and 0, and
      YAML writes `yes`, `no`, `on` and `off` as booleans too, so `epochs: on` would train for one epoch and
      `hidden: [on]` build a layer of one unit;
    - a number field refuses NaN and infinity (`.nan`, `.inf`, `1e999`): no setting means either, and they
      failed late (an accountant that never returns, NaN scores);
    - its `__init__` counts how deep validation is (`validation_depth`): pydantic validates a nested model
      through its class's `__init__`, and only the outermost call may turn the errors into one SpecError
      (`spec._Model`), so a nested field's path stays whole, inside a spec or inside an entry's params."""

    model_config = ConfigDict(allow_inf_nan=False)

    def __init__(self, /, **data: Any) -> None:
        depth = validation_depth()
        _validating.depth = depth + 1
        try:
            super().__init__(**data)
        finally:
            _validating.depth = depth

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return v
        number, numbers = _takes_numbers(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and number:
            raise ValueError(f"a number is expected, got {str(v).lower()}")
        if isinstance(v, list) and numbers and (i := next((i for i, x in enumerate(v) if isinstance(x, bool)), None)) is not None:
            raise ValueError(f"a list of numbers is expected, got {str(v[i]).lower()} at position {i}")
        return v


class Params(ValidatedModel):
    """Base class of every entry's parameters: unknown keys are errors, values are validated. A renamed
    parameter's field gives its old name(s) as `validation_alias` (`Field(5, validation_alias="n_dis")`, or
    `AliasChoices("older", "oldest")`): that is all a plug-in writes for the old spelling to keep working.
    `acts_when` declares the parameters that act only in a mode of the block (`{"freeze_depth":
    ActsWhen("freeze", ("depth",))}`): one given while its mode is at a default that turns it off is refused
    (`unused`), and a sweep's space is checked against the same declaration."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)
    acts_when: ClassVar[dict[str, ActsWhen]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        merged: dict[str, ActsWhen] = {}  # every base's declarations: GMI's params join the GAN's and LOMMA's
        for base in reversed(cls.__mro__):
            merged.update(base.__dict__.get("acts_when", {}))
        cls.acts_when = merged
        for name, cond in cls.acts_when.items():  # a typo in the declaration fails where the class is defined
            if name not in cls.model_fields or cond.field not in cls.model_fields:
                raise TypeError(f"{cls.__name__}.acts_when names {name!r} -> {cond.field!r}; its fields are "
                                f"{', '.join(cls.model_fields)}")
        old = cls.old_names()
        if not old:
            return
        # pydantic's signature names a field by its alias, which is the old name here: help() shows the new one
        sig = inspect.signature(cls)
        field_of = {o: f for f, names in old.items() for o in names}
        cls.__signature__ = sig.replace(parameters=[p.replace(name=field_of.get(p.name, p.name))
                                                    for p in sig.parameters.values()])
        cls.__doc__ = (inspect.cleandoc(cls.__doc__ or "") + "\n\nRenamed (the old name is still accepted): "
                       + ", ".join(f"{f} (also: {', '.join(names)})" for f, names in old.items()) + ".").lstrip()

    @classmethod
    def old_names(cls) -> dict[str, tuple[str, ...]]:
        """{field: its old names, newest first} for the renamed fields."""
        out = {}
        for name, f in cls.model_fields.items():
            alias = f.validation_alias
            names = tuple(a for a in (alias.choices if isinstance(alias, AliasChoices) else [alias])
                          if isinstance(a, str) and a != name) if alias is not None else ()
            if names:
                out[name] = names
        return out

    @classmethod
    def field_of(cls, key: str) -> str | None:
        """The field a params key names: itself, or the field it is an old name of; None for neither."""
        if key in cls.model_fields:
            return key
        return next((f for f, names in cls.old_names().items() if key in names), None)

    @classmethod
    def hashed(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """`raw` (a params block as written) with each renamed parameter under its oldest name: what
        fingerprints, cache keys and sweep states hash, so either spelling finds what was stored before the
        rename."""
        old = cls.old_names()
        return {old[f][-1] if (f := cls.field_of(k)) in old else k: v for k, v in raw.items()}

    def unused(self) -> list[tuple[str, str]]:
        """(field, why) for each parameter given explicitly whose mode, left at its default, turns it off
        (`acts_when`): `freeze_depth: 3` without `freeze: depth` would silently train with the default
        fraction. A block that gives the mode too chose it (a sweep's trial pins both modes' parameters), so
        only the default mode counts here."""
        out = []
        for name, cond in self.acts_when.items():
            mode = getattr(self, cond.field)
            if name in self.model_fields_set and cond.field not in self.model_fields_set and not cond.holds(mode):
                shown = "null" if mode is None else mode
                out.append((name, f"acts only with {cond}; {cond.field} is {shown} (its default): set "
                                  f"{cond.field} too, or leave {name} out"))
        return out

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for field, names in cls.old_names().items():
                given = [n for n in (field, *names) if n in v]
                if len(given) > 1:
                    raise ValueError(f"{given[0]} and {given[1]} are two names of one parameter: give it once, "
                                     f"as {field}")
        return v


# Bounds on how long a setting may train or search: far above any paper's setting, they turn a typo's extra
# zeros (epochs: 10000000) into one line before the run instead of a run that never ends.
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000


class NoParams(Params):
    pass


class OpenParams(Params):
    """The parameters of an entry named by import path: whatever the spec gives, as attributes."""

    model_config = ConfigDict(extra="allow", frozen=True)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    params: type[Params]
    doc: str

    def parse(self, raw: dict[str, Any] | None, where: str, alone: bool = False) -> Params:
        """`raw` validated as this entry's params; a parameter given while its default mode turns it off is
        refused (`Params.unused`) unless `alone` (one value of a sweep's space, checked with its mode there)."""
        try:
            parsed = self.params.model_validate(raw or {})
        except ValidationError as e:
            raise SpecError(_first_error(e, self), where=where) from None
        if not alone and (unused := parsed.unused()):
            name, why = unused[0]
            raise SpecError(why, where=f"{where}.{name}")
        return parsed


_TYPE_TAGS = {"int", "float", "str", "bool", "dict", "list", "none"}


def _names_a_field(part: str | int) -> bool:
    """Whether a part of a pydantic error's location is a field or a list index: where a field takes one of
    several types, pydantic adds the member's tag (`list[int]`, `literal['all']`, `bool`, `DataSpec`), which
    names no field."""
    return isinstance(part, int) or (re.fullmatch(r"[a-z_][a-z0-9_]*", part) is not None and part not in _TYPE_TAGS)


def first_error(e: ValidationError) -> tuple[tuple[str | int, ...], str, str]:
    """(location, message, error type) of a validation's first error, the location without union tags; for a
    field that takes one of several types, the message says what each of them wanted ("..., or accepted:
    'auto'")."""
    errors = e.errors()
    err = errors[0]
    loc = tuple(p for p in err["loc"] if _names_a_field(p))

    def text(x: Any) -> str:
        msg = x["msg"].removeprefix("Value error, ")
        return msg.replace("Input should be", "accepted:") if x["type"] == "literal_error" else msg

    if loc == err["loc"]:
        return loc, text(err), err["type"]
    same = [text(x) for x in errors if tuple(p for p in x["loc"] if _names_a_field(p)) == loc]
    return loc, ", or ".join(dict.fromkeys(same)), err["type"]


def _first_error(e: ValidationError, entry: Entry) -> str:
    loc_parts, msg, kind = first_error(e)
    loc = ".".join(str(x) for x in loc_parts)
    if kind == "extra_forbidden" and len(loc_parts) == 1:
        fields = list(entry.params.model_fields)
        msg = (f"unknown parameter of {entry.name!r}{did_you_mean(loc_parts[0], fields)}; accepted: "
               f"{', '.join(fields)}" if fields
               else f"unknown parameter: {entry.name!r} takes none")
    return f"{loc}: {msg}" if loc else msg


def summary(obj: object) -> str:
    """An entry's description when it gives none: the first paragraph of its docstring, on one line (a
    first sentence wrapped over two lines is not cut at the line's end)."""
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    head: list[str] = []
    for line in lines:
        if not line.strip():
            break
        head.append(line.strip())
    return " ".join(head)


def _redefined(before: object, obj: object) -> bool:
    """Whether `obj` is `before` defined again by the same code: the same module and qualified name, as when a
    notebook's cell or a script is run again, or its module reloaded. It replaces the entry; a name that two
    modules register stays an error."""
    return (getattr(before, "__module__", None) == getattr(obj, "__module__", None) is not None
            and getattr(before, "__qualname__", None) == getattr(obj, "__qualname__", None) is not None)


class Registry(Generic[T]):
    """Entries by name. `package`: the package whose modules register the entries, imported (with the
    third-party plug-ins) the first time the registry is read."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry[T]] = {}
        self._found = False
        self._discovering = False

    def register(self, name: str, params: type[Params] = NoParams, doc: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and not _redefined(self._entries[name].obj, obj):
                before = getattr(self._entries[name].obj, "__module__", "?")
                raise PluginError(f"{self.kind} {name!r} is registered twice, by {before} and by "
                                  f"{getattr(obj, '__module__', '?')}; give one of them another name")
            text = doc if doc is not None else summary(obj)
            self._entries[name] = Entry(name, obj, params, text)
            return obj

        return deco

    def discover(self) -> None:
        """Import the package's modules and the third-party plug-ins, once (again after a failure). Another
        thread waits until they are in; a module that reads the registry while it is imported sees it as is."""
        if self._found:
            return
        with _DISCOVERY:
            if self._found or self._discovering:
                return
            self._discovering = True
            try:
                if self.package is not None:
                    import_submodules(self.package)
                load_entry_points()
                self._found = True
            finally:
                self._discovering = False

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def get(self, name: str, where: str = "name") -> Entry[T]:
        """The entry registered as `name`, or for an import path `module:function` (`plugins.import_object`)
        that object with open parameters (`OpenParams`): called exactly as a registered entry is."""
        if is_import_path(name):
            obj = import_object(name, where)
            return Entry(name, obj, OpenParams, summary(obj))
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; accepted: "
                f"{', '.join(self.names())}", where=where
            ) from None

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def param_table(params: type[Params]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for each parameter of an entry, for `raymia list`; the type
    with its range where the parameter declares one (`float in [0, 1)`, `int >= 1`), the description with
    a renamed parameter's old names (`(also: n_dis)`)."""
    rows = []
    for fname, f in params.model_fields.items():
        ann, bounds = _type_name(f.annotation), _range(f.metadata)
        if bounds:  # the bounds of the number, not of None: `int >= 1 | None`
            optional = ann.endswith(" | None")
            ann = f"{ann.removesuffix(' | None')} {bounds}{' | None' if optional else ''}"
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        also = params.old_names().get(fname)
        cond = params.acts_when.get(fname)
        desc = ((f.description or "") + (f" (acts only with {cond})" if cond else "")
                + (f" (also: {', '.join(also)})" if also else ""))
        rows.append((fname, ann, default, desc.strip()))
    return rows


def _range(metadata: list[Any]) -> str:
    """A field's numeric bounds (pydantic's ge, gt, le, lt) as text: `in [0, 1)`, `>= 1`, `< 10`, or ''."""
    low = high = None
    for m in metadata:
        for attr, side in (("ge", "["), ("gt", "("), ("le", "]"), ("lt", ")")):
            value = getattr(m, attr, None)
            if value is not None:
                if side in "[(":
                    low = (side, value)
                else:
                    high = (side, value)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return ""


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Annotated:
        return _type_name(get_args(ann)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    if origin is not None and get_args(ann):
        inner = ", ".join(_type_name(a) for a in get_args(ann))
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        if name in ("Union", "UnionType"):
            return " | ".join(_type_name(a) for a in get_args(ann))
        return f"{name}[{inner}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
