"""A sweep spec's search space: resolved against the defenses' declarations, checked, described and drawn.

`resolve_space` applies the spec's overrides to each searched defense's `search_space()` (the declarations
of `raymia.space`) and checks every bound against the defense's params and modes (`Params.acts_when`);
`space_points` and `space_pairs` give the settings the defenses' checks run at before a sweep (`raymia
check` too); `describe_space` and `count_settings` say what the space holds; `DefineByRun` draws a trial's
setting through Optuna's define-by-run calls (any object with `suggest_*`), and `split_config` reads it back.
Free of Optuna and Ray, like the declarations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from raymia.errors import SpecError, did_you_mean
from raymia.registry import Params
from raymia.space import ActsWhen, Categorical, Domain, Float, Int, check_conditions, describe

if TYPE_CHECKING:
    from raymia.spec import SweepSpec


def resolve_space(spec: SweepSpec) -> dict[str, dict[str, Domain | Any]]:
    """{defense: {param: Domain | constant}}: each searched defense's declared space with the spec's
    overrides ({low, high[, log]}, {choices}, or a constant), every bound checked against its params. A
    searched parameter that acts only in a mode the space also searches (`Params.acts_when`) is drawn only
    in that mode (its domain's `when`, `_conditional`), whether the defense's space or the spec's gave it."""
    from raymia.defenses import DEFENSES

    several = bool(spec.sweep.defenses)
    out: dict[str, dict[str, Domain | Any]] = {}
    for i, choice in enumerate(spec.sweep.choices):
        at = f"sweep.defenses.{i}" if several else "sweep"
        entry = DEFENSES.get(choice.name, where=f"{at}.name" if several else "sweep.defense")
        space: dict[str, Domain | Any] = dict(entry.obj.search_space())
        given: dict[str, str] = {}  # field -> the key the space gave it under
        for key, raw in choice.space.items():
            where = f"{at}.space.{key}"
            name = entry.params.field_of(key)  # a renamed parameter's old name overrides it under its new one
            if name is None:
                raise SpecError(f"{choice.name!r} has no parameter {key!r}"
                                f"{did_you_mean(key, entry.params.model_fields)}; accepted: "
                                f"{', '.join(entry.params.model_fields)}", where=where)
            if name in given:
                raise SpecError(f"{given[name]} and {key} are two names of one parameter: give it once, as {name}",
                                where=f"{at}.space")
            given[name] = key
            if isinstance(raw, dict):
                try:
                    if "choices" in raw:
                        if set(raw) != {"choices"} or not isinstance(raw["choices"], list) or not raw["choices"]:
                            raise ValueError(_space_keys(raw, {"choices"}) + "expected {choices: [a, b, ...]}")
                        space[name] = Categorical(tuple(raw["choices"]))
                    else:
                        if not {"low", "high"} <= set(raw) <= {"low", "high", "log"}:
                            raise ValueError(_space_keys(raw, {"low", "high", "log"})
                                             + "expected {low, high[, log]} or {choices: [...]} or a constant")
                        low, high = (_bound(raw[k], k) for k in ("low", "high"))
                        if not isinstance(raw.get("log", False), bool):
                            raise ValueError(f"log must be true or false, got {raw['log']!r}")
                        kind = Int if all(isinstance(v, int) for v in (low, high)) else Float
                        space[name] = kind(low, high, raw.get("log", False))
                except (ValueError, TypeError) as e:
                    raise SpecError(str(e), where=where) from None
            else:
                space[name] = raw
        for name, dom in space.items():
            samples = list(dom.choices) if isinstance(dom, Categorical) else (
                [dom.low, dom.high] if isinstance(dom, Float | Int) else [dom])
            for v in samples:
                key = given.get(name, name)  # errors name the parameter as the space wrote it
                entry.parse({key: v}, where=f"{at}.space.{key}", alone=True)
        _check_modes(entry.params, space, given, at)
        out[choice.name] = _conditional(entry.params, space, at)
    return out


def _conditional(params: type[Params], space: dict[str, Domain | Any], at: str) -> dict[str, Domain | Any]:
    """`space` with each searched parameter whose mode is searched too drawn only when its mode turns it on
    (`when`: what `acts_when` declares; on a Categorical mode, the choices that turn it on), ordered after
    its mode so that a trial has drawn the mode when it comes to it. One whose mode's choices all turn it on
    is searched always."""
    space = dict(space)
    for name, dom in space.items():
        cond, mode = params.acts_when.get(name), None
        if cond is not None and isinstance(dom, Float | Int | Categorical):
            mode = space.get(cond.field)
        if not isinstance(mode, Float | Int | Categorical):
            continue
        if isinstance(mode, Categorical):
            on = tuple(c for c in mode.choices if cond.holds(c))
            if len(on) == len(mode.choices):
                continue
            if not (cond.given or cond.above is not None):  # `unless` too: its values may be no choice
                cond = ActsWhen(cond.field, on)
        space[name] = replace(dom, when=cond)
    order: list[str] = []
    for name in space:
        cond = getattr(space[name], "when", None)
        if cond is not None and cond.field not in order:
            order.append(cond.field)
        if name not in order:
            order.append(name)
    space = {n: space[n] for n in order}
    try:
        check_conditions(space)
    except ValueError as e:  # a mode that acts only in another mode, both searched
        raise SpecError(str(e), where=f"{at}.space") from None
    return space


def _ends(dom: Domain) -> list[tuple[Any, str]]:
    """(value, which end) of a searched dimension: its low and high end, or each choice."""
    if isinstance(dom, Categorical):
        return [(c, "choice") for c in dom.choices]
    return [(dom.low, "low end"), (dom.high, "high end")]


def _check_modes(params: type[Params], space: dict[str, Domain | Any], given: dict[str, str], at: str) -> None:
    """A parameter that acts only in a mode (`Params.acts_when`) must be able to act in the space: refused
    when the spec searches it while no value of its mode turns it on (trials that vary nothing), or gives it
    while the space leaves its mode at a default that turns it off (`freeze_depth: 3` without `freeze:
    depth`). A dimension of the defense's default space that the spec's mode leaves idle (`freeze_fraction`
    beside `freeze: depth`, `pretrain_epochs` beside `weights`) is dropped from `space`: the user did not ask
    for it. A constant beside a constant mode that turns it off is a pin, accepted."""
    for name, cond in params.acts_when.items():
        if name not in space:
            continue
        mode = space.get(cond.field, params.model_fields[cond.field].get_default(call_default_factory=True))
        values = [v for v, _ in _ends(mode)] if isinstance(mode, Float | Int | Categorical) else [mode]
        if any(cond.holds(v) for v in values):
            continue
        key, searched = given.get(name, name), isinstance(space[name], Float | Int | Categorical)
        if not searched and name in given and cond.field in space:
            continue
        if searched and name not in given and cond.field in given:
            del space[name]
            continue
        now = (describe(mode) if isinstance(mode, Float | Int | Categorical) else "null" if mode is None else mode)
        where_mode = "in this space" if cond.field in space else "(its default)"
        if searched:
            raise SpecError(f"searched ({describe(space[name])}), but {key} acts only with {cond}, and "
                            f"{cond.field} is {now} {where_mode}: give {key} one value, or search {cond.field} too",
                            where=f"{at}.space.{key}")
        raise SpecError(f"{key} acts only with {cond}; {cond.field} is {now} {where_mode}: add {cond.field} to "
                        f"the space, or leave {key} out", where=f"{at}.space.{key}")


def _inside(dom: Domain, default: Any) -> Any:
    """The value that stands for a searched dimension while another is at its end: its default where the
    space holds it, else the nearest end (a default outside the range is no trial's setting)."""
    if isinstance(dom, Categorical):
        return default if default in dom.choices else dom.choices[0]
    if isinstance(default, int | float) and not isinstance(default, bool) and dom.low <= default <= dom.high:
        return default
    return dom.high if isinstance(default, int | float) and default > dom.high else dom.low


def space_points(params: type[Params], space: dict[str, Domain | Any]):
    """(name, value, which end, params) of the settings of a defense's space that its checks see: first the
    base (name None: every searched dimension inside its range, `_inside`), then each searched dimension at
    each end (or choice) with the others at the base, a parameter that acts only in a mode checked in a
    mode the space turns it on in (`_acting`). The defense's checks are cheap, so a range that reaches a
    setting they refuse is one line before the sweep, not a failure in each trial that draws it."""
    defaults, base = _base(params, space)
    yield None, None, "", base
    for name, dom in space.items():
        if not isinstance(dom, Float | Int | Categorical):
            continue
        for v, which in _ends(dom):
            if (point := _acting(params, space, {**base, name: v}, (name,), defaults)) is not None:
                yield name, v, which, point


def space_pairs(params: type[Params], space: dict[str, Domain | Any]):
    """((name, value, which end), (name, value, which end), params) for every two searched dimensions at
    each pair of their ends or choices, the others at the base (`space_points`): two parameters a defense
    refuses together (SELENA's `excluded_per_point` must stay below `sub_models`) are refused at a corner of
    their ranges, where each end alone, beside the other's base value, passes. A combination no trial draws
    (a parameter beside a value of its mode that idles it) is left out."""
    defaults, base = _base(params, space)
    searched = [n for n, dom in space.items() if isinstance(dom, Float | Int | Categorical)]
    for a, b in itertools.combinations(searched, 2):
        for (va, wa), (vb, wb) in itertools.product(_ends(space[a]), _ends(space[b])):
            if (point := _acting(params, space, {**base, a: va, b: vb}, (a, b), defaults)) is not None:
                yield (a, va, wa), (b, vb, wb), point


def _base(params: type[Params], space: dict[str, Domain | Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the params' defaults, the space's base setting: each searched dimension inside its range)."""
    defaults = {n: f.get_default(call_default_factory=True) for n, f in params.model_fields.items()}
    return defaults, {n: _inside(v, defaults[n]) if isinstance(v, Float | Int | Categorical) else v
                      for n, v in space.items()}


def _acting(params: type[Params], space: dict[str, Domain | Any], point: dict[str, Any], moved: tuple[str, ...],
            defaults: dict[str, Any]) -> dict[str, Any] | None:
    """`point` with the mode of each `moved` parameter that acts only in a mode set to the first end or
    choice of the mode's range that turns it on, or None where no trial draws such a setting: its mode is
    pinned to a value that idles it (`_check_modes`), or is itself moved to one."""
    point = dict(point)
    for name in moved:
        cond = params.acts_when.get(name)
        if cond is None or cond.holds(point.get(cond.field, defaults[cond.field])):
            continue
        mode = space.get(cond.field)
        on = [m for m, _ in _ends(mode) if cond.holds(m)] if isinstance(mode, Float | Int | Categorical) else []
        if cond.field in moved or not on:
            return None
        point[cond.field] = on[0]
    for name in moved:  # a mode set for one moved parameter may idle the other
        cond = params.acts_when.get(name)
        if cond is not None and not cond.holds(point.get(cond.field, defaults[cond.field])):
            return None
    return point


def _bound(v: Any, key: str) -> int | float:
    """A range's low or high: a finite number. YAML reads `1e-4` (no dot) as text, which a number field takes
    as its number: so does a range."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} must be a finite number, got {v!r}")
    return v


def _space_keys(raw: dict, accepted: set[str]) -> str:
    """"unknown key 'hgh'; " for the keys of a space override that are none of `accepted` (a typo), else ""."""
    unknown = [str(k) for k in raw if k not in accepted]
    hint = did_you_mean(unknown[0], sorted(accepted)) if len(unknown) == 1 else ""
    return f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; " if unknown else ""


def describe_space(space: dict[str, dict[str, Domain | Any]]) -> dict[str, str]:
    """{defense: "gamma [0.3, 0.99], alpha log [0.0001, 0.05], ..."}: a resolved space for people; a constant
    that only some of the searched modes use says which (`temperature 2.0 if top_k not 1`)."""
    def text(k: str, v: Any, pins: dict[str, tuple[ActsWhen, Any]]) -> str:
        if isinstance(v, Float | Int | Categorical):
            return describe(v)
        return repr(v) + (f" if {pins[k][0]}" if k in pins else "")

    return {d: ", ".join(f"{k} {text(k, v, pins)}" for k, v in sp.items()) or "no parameters"
            for d, sp in space.items() for pins in [_pins(d, sp)]}


def count_settings(space: dict[str, dict[str, Domain | Any]]) -> int | None:
    """How many distinct settings a space holds when every searched parameter is discrete (Int,
    Categorical; constants count once), summed over its defenses; None when one is continuous. A parameter
    searched only in some modes (`when`) multiplies only the settings of those modes."""
    total = 0
    for sp in space.values():
        searched = {k: v for k, v in sp.items() if isinstance(v, Float | Int | Categorical)}
        if any(isinstance(v, Float) for v in searched.values()):
            return None
        values = {k: range(v.low, v.high + 1) if isinstance(v, Int) else v.choices for k, v in searched.items()}
        modes = [k for k in searched if any(v.when is not None and v.when.field == k for v in searched.values())]
        for drawn in itertools.product(*(values[m] for m in modes)):  # one combination of the modes' values
            mode = dict(zip(modes, drawn, strict=True))
            total += math.prod(len(values[k]) for k, v in searched.items()
                               if k not in mode and (v.when is None or v.when.holds(mode[v.when.field])))
    return total


class DefineByRun:
    """Optuna define-by-run space (a picklable object: Tune checkpoints the searcher): each trial picks a
    defense (when several are searched) and samples its space. Parameters are named "<defense>.<param>".
    A parameter searched only in some modes (`when`) is not suggested in a trial whose drawn mode turns it
    off: it is absent from the trial's config, so the defense takes its default, and the sampler models it
    only from the trials that drew it. So is a constant beside its searched mode (`temperature: 2.0` while
    `top_k` is searched) in the trials whose mode turns it off: no two trials differ only in a value their
    defense ignores."""

    def __init__(self, spaces: dict[str, dict[str, Any]]):
        for sp in spaces.values():
            check_conditions(sp)
        self.spaces = spaces
        self.pins = {d: _pins(d, sp) for d, sp in spaces.items()}

    def __call__(self, trial) -> dict[str, Any]:
        names = list(self.spaces)
        defense = names[0] if len(names) == 1 else trial.suggest_categorical("defense", names)
        const: dict[str, Any] = {"defense": defense}
        drawn: dict[str, Any] = {}
        for name, dom in self.spaces[defense].items():
            key = f"{defense}.{name}"
            if isinstance(dom, Float | Int | Categorical) and dom.when is not None \
                    and not dom.when.holds(drawn[dom.when.field]):
                continue
            if isinstance(dom, Float):
                drawn[name] = trial.suggest_float(key, dom.low, dom.high, log=dom.log)
            elif isinstance(dom, Int):
                drawn[name] = trial.suggest_int(key, dom.low, dom.high, log=dom.log)
            elif isinstance(dom, Categorical):
                drawn[name] = trial.suggest_categorical(key, list(dom.choices))
            else:
                const[key] = dom
        # a searcher pickled by a sweep begun before pins were kept has none (Tune restores it on resume)
        for name, (cond, default) in getattr(self, "pins", {}).get(defense, {}).items():
            if not cond.holds(drawn.get(cond.field, default)):
                del const[f"{defense}.{name}"]
        return const


def _pins(defense: str, space: dict[str, Any]) -> dict[str, tuple[ActsWhen, Any]]:
    """{name: (its condition, its mode's default)} for each constant of a defense's space that acts only in a
    mode the space searches (`Params.acts_when`): the trials whose drawn mode turns it off leave it out."""
    searched = {n for n, v in space.items() if isinstance(v, Float | Int | Categorical)}
    if len(searched) == len(space):
        return {}
    from raymia.defenses import DEFENSES

    params = DEFENSES.get(defense).params
    return {n: (c, params.model_fields[c.field].get_default(call_default_factory=True))
            for n in space if n not in searched and (c := params.acts_when.get(n)) is not None and c.field in searched}


def split_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A trial's config -> (defense name, its params without the "<defense>." prefix)."""
    name = config.get("defense", "none")
    prefix = f"{name}."
    return name, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
