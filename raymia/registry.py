"""Name -> implementation registries with typed, documented parameters.

Every pluggable part (data set, model, defense, attack) registers here with a pydantic model of its
parameters. The registry validates a spec's `params` against that model, so an unknown or out-of-range
parameter is reported with its dotted field path, and `raymia list` prints every entry with its defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from raymia.errors import SpecError

T = TypeVar("T")


class Params(BaseModel):
    """Base class of every entry's parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    params: type[Params]
    doc: str

    def parse(self, raw: dict[str, Any] | None, where: str) -> Params:
        try:
            return self.params.model_validate(raw or {})
        except ValidationError as e:
            raise SpecError(_first_error(e, self), where=where) from None


def _first_error(e: ValidationError, entry: Entry) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        fields = list(entry.params.model_fields)
        msg = (f"unknown parameter of {entry.name!r}; accepted: {', '.join(fields)}" if fields
               else f"unknown parameter: {entry.name!r} takes none")
    return f"{loc}: {msg}" if loc else msg


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[Params] = NoParams, doc: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            text = doc if doc is not None else (getattr(obj, "__doc__", None) or "").strip().splitlines()
            if isinstance(text, list):
                text = text[0] if text else ""
            self._entries[name] = Entry(name, obj, params, text)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, where: str = "name") -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(
                f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}", where=where
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def param_table(params: type[Params]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for each parameter of an entry, for `raymia list`."""
    rows = []
    for fname, f in params.model_fields.items():
        ann = _type_name(f.annotation)
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append((fname, ann, default, f.description or ""))
    return rows


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
