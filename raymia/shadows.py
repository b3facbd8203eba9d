"""How an attack's strength grows with the number of shadow models, from one stored bank.

An audit attacks each target with all of its shadows. Attacking it again with fewer of them (random
subsets of its shadows, nested: each subset holds the smaller ones) says whether the bank was large enough:
a curve still rising at the audit's count means more shadows would have found more leakage (LiRA online,
which fits a Gaussian per point and side, needs the most; Carlini et al. 2022 advise its fixed variance
when shadows are few). Shadows are drawn in whole complementary pairs where the bank has them, so that
every point keeps as many IN as OUT shadows. Nothing trains: the stored signals are attacked again, and at
the audit's own count the scores are the audit's.

    curve = raymia.shadow_curve(result)         # an AuditResult, a report folder, or a spec
    curve.table("tpr_fpr_0.01")                 # mean and std over the targets per number of shadows
    curve.plot("shadows.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raymia.signals import Signals


@dataclass(frozen=True)
class ShadowCurve:
    """Every attack's metrics against every target with `shadows[i]` shadow models.

    values[attack][metric]: float64 [len(shadows), len(targets)], NaN where the metric is n/a (a TPR at an
    FPR level the target's non-members cannot resolve).
    """

    shadows: tuple[int, ...]
    targets: tuple[int, ...]
    values: dict[str, dict[str, np.ndarray]]
    notes: tuple[str, ...] = ()  # sizes an attack cannot run with, and why (its values there are NaN)

    @property
    def attacks(self) -> list[str]:
        return list(self.values)

    @property
    def metrics(self) -> list[str]:
        return list(next(iter(self.values.values())))

    def mean(self, attack: str, metric: str = "auc") -> np.ndarray:
        """[len(shadows)]: the mean over the targets (NaN where every target's value is n/a)."""
        return _nan_stat(np.nanmean, self._get(attack, metric))

    def std(self, attack: str, metric: str = "auc") -> np.ndarray:
        """[len(shadows)]: the standard deviation over the targets (numpy's, ddof 0, as the audit reports)."""
        return _nan_stat(np.nanstd, self._get(attack, metric))

    def table(self, metric: str = "auc"):
        """A pandas DataFrame: one row per number of shadows, the mean and std of `metric` per attack."""
        import pandas as pd

        cols: dict[str, Any] = {}
        for a in self.values:
            cols[a], cols[f"{a}_std"] = self.mean(a, metric), self.std(a, metric)
        return pd.DataFrame(cols, index=pd.Index(self.shadows, name="shadows"))

    def plot(self, path: str | Path, metric: str = "auc") -> Path:
        """`metric` against the number of shadows (log scale), a line per attack with its std over the targets
        as a band: a PNG at `path`."""
        from raymia.report.plots import plot_shadow_curve

        self._get(self.attacks[0], metric)
        return plot_shadow_curve(self, metric, path)

    def write(self, folder: str | Path, metric: str = "auc") -> tuple[Path, Path]:
        """shadows.png (`metric`) and shadows.csv (every metric: attack, metric, shadows, mean, std) in
        `folder`."""
        from raymia.report.plots import SHADOWS_CSV, SHADOWS_PNG

        folder = Path(folder)
        rows = [(a, m, k, float(self.mean(a, m)[i]), float(self.std(a, m)[i]))
                for a in self.attacks for m in self.metrics for i, k in enumerate(self.shadows)]
        png = self.plot(folder / SHADOWS_PNG, metric)
        csv = folder / SHADOWS_CSV
        csv.write_text("attack,metric,shadows,mean,std\n"
                       + "".join(f"{a},{m},{k},{mean!r},{sd!r}\n" for a, m, k, mean, sd in rows))
        return png, csv

    def _get(self, attack: str, metric: str) -> np.ndarray:
        if attack not in self.values:
            raise KeyError(f"no attack {attack!r} in this curve; it has {', '.join(self.values)}")
        if metric not in self.values[attack]:
            raise KeyError(f"no metric {metric!r} in this curve; it has {', '.join(self.values[attack])}")
        return self.values[attack][metric]


def _nan_stat(fn, v: np.ndarray) -> np.ndarray:
    out = np.full(v.shape[0], np.nan)
    ok = ~np.all(np.isnan(v), axis=1)
    out[ok] = fn(v[ok], axis=1)
    return out


def shadow_units(signals: Signals, target: int) -> list[tuple[int, ...]]:
    """The target's shadows grouped as they are drawn: complementary pairs, and single models where a
    shadow's pair is not among them (a hand-made bank, a pool that splits a pair)."""
    shadows = [int(m) for m in signals.shadows_of(target)]
    left, units = set(shadows), []
    for m in shadows:
        if m not in left:
            continue
        pair = signals.paired_model(m)
        unit = (m, pair) if pair is not None and pair in left else (m,)
        left.difference_update(unit)
        units.append(unit)
    return units


def curve_metrics(fpr_levels: Sequence[float]) -> list[str]:
    """The metrics a curve holds for each attack: `metrics.attack_metrics`' keys at these FPR levels."""
    from raymia.metrics import fpr_key

    return ["auc", "balanced_accuracy", *(fpr_key(float(f)) for f in fpr_levels)]


def default_shadows(total: int) -> list[int]:
    """2, 4, 8, ... below `total`, then `total` (the audit's own count)."""
    sizes, k = [], 2
    while k < total:
        sizes.append(k)
        k *= 2
    return [*sizes, total]


def _attacked(of: Any) -> list[str]:
    """The attacks an audit reported (its result, or the result.json of its folder; none for a spec)."""
    import json

    from raymia.audit import AuditResult

    if isinstance(of, AuditResult):
        return list(of.attacks)
    path = Path(of) if isinstance(of, str | Path) else None
    if path is not None and path.name != "result.json":
        path = path / "result.json"
    if path is None or not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("attacks", {}))


def shadow_pools(signals: Signals, targets: Sequence[int], shadows: Sequence[int] | None = None,
                 seed: int = 0) -> dict[int, dict[int, np.ndarray]]:
    """{target: {k: bool [M]}}: the k shadows each target is attacked with, drawn as whole units
    (`shadow_units`) in a random order per target and its pair (`seed`), each size's set holding the smaller
    ones'. `shadows` default: `default_shadows` of the targets' count; a size that no prefix of whole units
    reaches is a ValueError naming those that are."""
    pools: dict[int, dict[int, np.ndarray]] = {}
    for t in targets:
        units = shadow_units(signals, t)
        pair = signals.paired_model(t)  # a target and its pair draw from the same shadows, in the same order
        order = np.random.default_rng([seed, t if pair is None else min(t, pair)]).permutation(len(units))
        reach = np.cumsum([len(units[i]) for i in order])
        if shadows is None:  # powers of two where whole units reach them (the largest below where not)
            sizes = sorted({int(reach[reach <= k].max()) for k in default_shadows(int(reach[-1]))})
        else:
            sizes = sorted({int(k) for k in shadows})
            if bad := [k for k in sizes if k not in reach]:
                kind = "complementary pairs" if all(len(u) == 2 for u in units) else "pairs and single models"
                raise ValueError(f"shadows {bad} cannot be drawn for target {t}: its {int(reach[-1])} shadows are "
                                 f"{kind}; accepted: {', '.join(str(int(r)) for r in reach)}")
        pools[t] = {}
        for k in sizes:
            pool = np.zeros(signals.num_models, dtype=bool)
            for i in order[:int(np.searchsorted(reach, k)) + 1]:
                pool[list(units[i])] = True
            pools[t][k] = pool
    if len({tuple(p) for p in pools.values()}) > 1:
        raise ValueError("the targets have different numbers of shadows; give shadows= sizes that every one reaches")
    return pools


def shadow_curve(
    of: Any = None,
    *,
    signals: Signals | None = None,
    attacks: Sequence[Any] | None = None,
    targets: Sequence[int] | None = None,
    shadows: Sequence[int] | None = None,
    fpr_levels: Sequence[float] | None = None,
    seed: int = 0,
) -> ShadowCurve:
    """Each attack against each target with nested random subsets of its shadows, `shadows` models each.

    `of`: an audit (an AuditResult, its report folder, or its spec): its stored signals as its attacker saw
    them (`read_signals`), its attacks, targets and FPR levels, each of which the keywords may replace.
    Without `of`: `signals` and `attacks` (names, or (name, params) pairs; `targets` default: every model).
    `shadows` default: 2, 4, 8, ... and the targets' full count; each must be reachable by whole pairs of
    the target's shadows. `seed` draws each target's order of pairs (nested subsets).
    """
    from raymia import progress
    from raymia.metrics import DEFAULT_FPR_LEVELS

    entries: list[tuple[str, str, Any]] = []  # (label, name, params)
    if of is not None:
        from raymia.audit import AuditResult, read_signals, spec_of

        spec = spec_of(of)
        signals = read_signals(of) if signals is None else signals
        entries = [(a.key, a.name, a.params) for a in spec.attacks]
        if "label_only" in _attacked(of) and not any("label_only" in e[:2] for e in entries):
            entries.append(("label_only", "label_only", {"calibrated": True}))  # audit.attacks_to_run's addition
        if targets is None:  # the audit's: with `target:` the user's model, the signals' last row
            targets = (of.targets if isinstance(of, AuditResult) else
                       [signals.num_models - 1] if spec.target is not None else spec.plan.target_list)
        fpr_levels = spec.metrics.fpr_levels if fpr_levels is None else fpr_levels
    if signals is None:
        raise ValueError("shadow_curve needs an audit (its result, report folder or spec) or signals=")
    if attacks is not None:
        entries = [(a, a, None) if isinstance(a, str) else (a[0], a[0], a[1]) for a in attacks]
    if not entries:
        raise ValueError("shadow_curve needs attacks: names, or (name, params) pairs")
    targets = list(range(signals.num_models)) if targets is None else [int(t) for t in targets]
    fpr_levels = tuple(DEFAULT_FPR_LEVELS if fpr_levels is None else fpr_levels)

    pools = shadow_pools(signals, targets, shadows, seed)
    sizes = sorted(next(iter(pools.values())))

    values: dict[str, dict[str, np.ndarray]] = {}
    notes: dict[tuple[str, int], str] = {}
    with progress.bar("shadow curve: attacks x targets x sizes", len(entries) * len(targets) * len(sizes)) as shown:
        for label, name, params in entries:
            values[label] = _attack_curve(signals, label, name, params, targets, pools, sizes, fpr_levels,
                                          notes, shown)
    return ShadowCurve(tuple(sizes), tuple(targets), values, tuple(notes.values()))


def _attack_curve(signals: Signals, label: str, name: str, params: Any, targets: list[int],
                  pools: dict[int, dict[int, np.ndarray]], sizes: list[int], fpr_levels: tuple[float, ...],
                  notes: dict[tuple[str, int], str], shown) -> dict[str, np.ndarray]:
    """One attack's metrics [sizes, targets] (NaN where it cannot run, with a note)."""
    from raymia.attacks import run_attack
    from raymia.metrics import attack_metrics

    where = f"shadow_curve.{label}"
    per = {m: np.full((len(sizes), len(targets)), np.nan) for m in curve_metrics(fpr_levels)}
    for j, t in enumerate(targets):
        full = signals.shadow_mask(t)
        if j == 0 and not any(np.array_equal(full, pool) for pool in pools[t].values()):
            run_attack(name, params, signals, t, where=where)  # the per-model transforms every view reads
        # the largest first: its run on the signals themselves keeps the per-model transforms the
        # smaller subsets' views read (a view keeps only its own fits, which go with it)
        for i in reversed(range(len(sizes))):
            pool = pools[t][sizes[i]]
            if np.array_equal(pool, full):  # the audit's own shadows: an error here is the audit's too
                scores = run_attack(name, params, signals, t, where=where)
            else:
                try:
                    scores = run_attack(name, params, signals.with_shadow_pool(pool), t, where=where)
                except ValueError as e:  # too few shadows for the attack (rmia_offline's tuning of a)
                    notes.setdefault((label, sizes[i]), f"{label} with {sizes[i]} shadows: n/a ({e})")
                    shown.advance()
                    continue
            for metric, v in attack_metrics(scores, signals.keep[t], fpr_levels).items():
                per[metric][i, j] = np.nan if v is None else v
            shown.advance()
    signals.forget_derived()  # this attack's transforms, shared by its targets and sizes
    return per
