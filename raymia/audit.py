"""run_audit(spec): the one function that wires the pipeline.

spec -> membership plan -> bank (warm Ray pool, packs stored as signals) -> attacks -> metrics -> report
(table, result.json, ROC plot) -> MLflow run. Stored signals with the spec's fingerprint are reused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from raymia import __version__
from raymia.caller import as_found, in_daemon_thread
from raymia.metric_names import BANK_UTILITY, TARGET_UTILITY, check_gate, gate_line
from raymia.report.records import PointScores
from raymia.spec import AuditSpec, SweepSpec
from raymia.storage import absolute, check_locations
from raymia.store import SignalStore

log = logging.getLogger("raymia")



@dataclass
class AuditResult:
    """What `run_audit` returns (result.json holds the same, `to_json`). Every attack's metrics are keyed by
    the attack's label (default: its name) and then by metric: "auc", "balanced_accuracy", "tpr_fpr_<level>"
    for each `metrics.fpr_levels`, "tnr_fnr_<level>", "epsilon_lb", with `metrics.bootstrap` the CIs
    ("auc_ci_low", ...); None where a level needs more points than the audit has.

    attacks, attacks_std: {attack: {metric: mean / std over the targets}}, the spec's attacks and, for a
    defense that changes the released outputs, `label_only` with {"calibrated": True} unless the spec lists
    it (`metrics.label_only_for_output_defenses`); per_target: {attack: [one metrics
    dict per target, in the order of `targets`]}, each what `raymia.full_metrics(scores, signals.keep[t],
    fpr_levels, fnr_levels, n_boot=metrics.bootstrap, seed=spec.seed)` gives for that target's scores.
    utility, utility_std: train_accuracy, test_accuracy, generalization_gap, test_ece of the attacked models
    (mean, std over targets) and bank_test_accuracy. defense_report: the defense's per-model facts and its
    guarantee. targets: the attacked rows of the signals (`raymia.read_signals(result)`). points: every
    attack's scores, `points.scores[attack]` float64 [len(targets), P]. roc: the first target's ROC curve per
    attack. fingerprint: the bank's key in the store; reused_signals: nothing was trained. out_dir: the
    report's folder. flat_metrics(): the same numbers under the names sweeps and MLflow use. gate: the spec's
    gate, each condition as {metric, op, value, actual, passed}; gate_failures: those that fail."""

    spec: AuditSpec
    fingerprint: str
    attacks: dict[str, dict[str, float | None]]  # attack -> metric -> mean over targets (None: n/a)
    attacks_std: dict[str, dict[str, float | None]]
    per_target: dict[str, list[dict[str, float | None]]]  # attack -> one metrics dict per target
    defense_report: dict[str, float]  # the defense's per-model facts (mean over the bank), its guarantee
    utility: dict[str, float]
    utility_std: dict[str, float]  # std over targets of the per-target utility metrics
    reused_signals: bool
    out_dir: Path
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)
    seconds: float = 0.0
    inversion: Any = None  # raymia.inversion.protocol.InversionResult when the spec asks for inversion
    ood: Any = None  # raymia.ood_audit.OodResult when the spec names non-member sets
    targets: list[int] = field(default_factory=list)  # the attacked rows of the signals (plan.targets, or M)
    target: dict[str, Any] | None = None  # the user's own target (`target:`): where its outputs came from
    points: Any = field(repr=False, default=None)  # raymia.report.records.PointScores: every point's scores
    # `metrics.raw_outputs`: the attacks on the outputs before the defense's post-processing (mean, std over
    # targets); the released outputs' own numbers where the defense post-processes nothing
    raw_attacks: dict[str, dict[str, float | None]] | None = None
    raw_attacks_std: dict[str, dict[str, float | None]] | None = None
    # the spec's gate, each condition with its value and outcome (`check_gate`); empty without one
    gate: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = self.spec.plan.target_list

    @property
    def gate_failures(self) -> list[dict[str, Any]]:
        """The gate's conditions that the results do not meet (a metric that is n/a meets none)."""
        return [g for g in self.gate if not g["passed"]]

    @functools.cached_property
    def vulnerable(self) -> list[dict[str, Any]]:
        """The members that leak most (`report.records.vulnerable`): index, label, how many attacks flag them."""
        from raymia.report.records import vulnerable

        return vulnerable(self.points) if self.points is not None else []

    def flat_metrics(self) -> dict[str, float | None]:
        """{"test_accuracy": .., "lira_online/auc": .., ...}: the names objectives and MLflow use, each the
        mean over the targets, and beside each, under `spread_key(name)` ("std/lira_online/auc"), its std
        over the targets (None with a single target: one model gives no spread)."""
        from raymia.metrics import spread_key

        spread = len(self.targets) > 1
        out: dict[str, float | None] = dict(self.utility)
        std: dict[str, float | None] = {k: v if spread else None for k, v in self.utility_std.items()}
        out.update({f"defense/{k}": v for k, v in self.defense_report.items()})
        _flat_attacks(self.attacks, self.attacks_std, "", spread, out, std)
        if self.raw_attacks is not None:  # raw/<attack>/<metric>, raw/worst/<metric>
            _flat_attacks(self.raw_attacks, self.raw_attacks_std or {}, "raw/", spread, out, std)
        if self.ood is not None:  # ood/<attack>/<set>/<metric>
            out.update(self.ood.flat_metrics())
            std.update({k: v if spread else None for k, v in self.ood.flat_std().items()})
        if self.inversion is not None:  # mi/<attack>/<metric>, std over the inverted targets
            many = len(self.inversion.targets) > 1
            out.update(self.inversion.flat_metrics())
            std.update({k: v if many else None for k, v in self.inversion.flat_std().items()})
        out.update({spread_key(k): v for k, v in std.items()})
        return out

    def table(self):
        """A pandas DataFrame of the attacks' metrics: one row per attack label (and "raw/<label>" with
        `metrics.raw_outputs`), a column per metric key ("auc", "tpr_fpr_0.01", ...), each followed by its std
        over the targets ("auc_std"; NaN with a single target) and, with `metrics.bootstrap`, its interval
        ("auc_ci_low", "auc_ci_high"). The values are `flat_metrics()`'s (None is NaN)."""
        import pandas as pd  # imported here: a sweep's processes load this module and never need pandas

        from raymia.metrics import spread_key

        flat = self.flat_metrics()
        rows: dict[str, dict[str, float | None]] = {}
        for prefix, attacks in (("", self.attacks), ("raw/", self.raw_attacks or {})):
            for a, ms in attacks.items():
                row = rows[f"{prefix}{a}"] = {}
                for k in ms:
                    if "_ci_" in k:
                        continue
                    row[k] = flat[f"{prefix}{a}/{k}"]
                    row[f"{k}_std"] = flat[spread_key(f"{prefix}{a}/{k}")]
                    for end in ("_ci_low", "_ci_high"):
                        if k + end in ms:
                            row[k + end] = flat[f"{prefix}{a}/{k}{end}"]
        table = pd.DataFrame.from_dict(rows, orient="index", dtype=float)
        table.index.name = "attack"
        return table

    def __repr__(self) -> str:
        """A few lines for a notebook or a prompt, never arrays: the audit, its utility, each attack's AUC and
        TPR at the lowest FPR level every attack resolves (as the console table writes them), with `ood:` each attack's mean FPR on
        the non-member sets, with `inversion:` each inversion attack's top-1, the report's folder."""
        from raymia.metrics import fpr_key, metric_label

        spec, many = self.spec, len(self.targets) > 1
        who = (f"your model ({self.target['source']}), {spec.plan.num_models} shadows" if self.target
               else f"{spec.plan.num_models} models, {len(self.targets)} target{'s' if many else ''}")
        lines = [f"AuditResult {spec.name} [{self.fingerprint}]: defense {spec.defense.name}, {who}"
                 + (" (mean ± std over targets)" if many else ""), f"  {utility_line(self.utility)}"]
        # the lowest FPR level every attack resolves: the regime membership inference is judged in (Carlini et
        # al.), not the 10% the default levels start with; too few non-members leave the lower levels undefined
        resolved = [k for k in map(fpr_key, sorted(spec.metrics.fpr_levels))
                    if all(ms.get(k) is not None for ms in self.attacks.values())]
        level = resolved[0] if resolved else fpr_key(spec.metrics.fpr_levels[0])
        width = max(map(len, self.attacks), default=0)
        for a, ms in self.attacks.items():
            sd = self.attacks_std.get(a, {})
            lines.append(f"  {a:<{width}}  AUC {attack_cell(ms, sd.get('auc'), 'auc', many)}  "
                         f"{metric_label(level)} {attack_cell(ms, sd.get(level), level, many)}")
        if self.ood is not None and self.ood.attacks:
            lines.append("  OOD FPR (mean over the sets): "
                         + ", ".join(f"{a} {fmt(self.ood.mean_fpr(a), True)}" for a in self.ood.attacks))
        if self.inversion is not None and self.inversion.attacks:
            lines.append("  inversion top-1: "
                         + ", ".join(f"{a} {fmt(ms.get('top1'), True)}" for a, ms in self.inversion.attacks.items()))
        lines.append(f"  report: {self.out_dir}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """What a notebook shows: report.html's own summary, utility and attack tables, and the ROC curves
        (roc.png, read from the report's folder)."""
        from raymia.report.html import audit_fragment

        return audit_fragment(self.to_json(), self.out_dir)

    def to_json(self) -> dict[str, Any]:
        return {
            "raymia_version": __version__,
            "name": self.spec.name,
            "fingerprint": self.fingerprint,
            "spec": self.spec.model_dump(mode="json"),
            "targets": self.targets,
            **({"target": self.target} if self.target is not None else {}),
            # what each target's rates rest on: a TPR at 1% FPR over 200 non-members is 2 of them
            **({"members_per_target": [int(m.sum()) for m in self.points.member],
                "nonmembers_per_target": [int((~m).sum()) for m in self.points.member]}
               if self.points is not None else {}),
            "utility": self.utility,
            "utility_std_over_targets": self.utility_std,
            "defense": {"name": self.spec.defense.name, "params": self.spec.defense.params,
                        "report": self.defense_report},
            "attacks": self.attacks,
            "attacks_std_over_targets": self.attacks_std,
            "attacks_per_target": self.per_target,
            **({"raw_attacks": self.raw_attacks, "raw_attacks_std_over_targets": self.raw_attacks_std}
               if self.raw_attacks is not None else {}),
            "inversion": self.inversion.to_json() if self.inversion is not None else None,
            "ood": self.ood.to_json() if self.ood is not None else None,
            **({"gate": self.gate} if self.gate else {}),
            "vulnerable": self.vulnerable,
            "reused_signals": self.reused_signals,
            "seconds": round(self.seconds, 2),
            "metrics": self.flat_metrics(),
        }


def _flat_attacks(attacks: dict, attacks_std: dict, prefix: str, spread: bool, out: dict, std: dict) -> None:
    """<prefix><attack>/<metric> and <prefix>worst/<metric> (the strongest attack's value: every attack
    metric grows with leakage) into `out`, their spreads over the targets into `std`."""
    for a, ms in attacks.items():
        for k, v in ms.items():
            out[f"{prefix}{a}/{k}"] = v
            if "_ci_" not in k:
                std[f"{prefix}{a}/{k}"] = attacks_std.get(a, {}).get(k) if spread else None
    for k in next(iter(attacks.values()), {}):
        if "_ci_" in k:
            continue
        vals = {a: ms[k] for a, ms in attacks.items() if ms.get(k) is not None}
        strongest = max(vals, key=vals.get) if vals else None
        out[f"{prefix}worst/{k}"] = vals[strongest] if strongest else None
        std[f"{prefix}worst/{k}"] = std.get(f"{prefix}{strongest}/{k}") if strongest else None


def load_signals(store: SignalStore, keep: np.ndarray, labels: np.ndarray, test_labels: np.ndarray,
                 raw: bool = False):
    """Signals of the whole bank; the test split (no model trained on it) rides along as population z.
    `raw`: the outputs before the defense's post-processing (`metrics.raw_outputs`; a pack that stores
    none post-processed nothing, and its released outputs are the raw ones)."""
    from raymia.signals import Signals

    packs = [store.read_pack(p) for p in range(store.num_packs)]
    pick = (lambda p, k: p.get(f"raw_{k}", p[k])) if raw else (lambda p, k: p[k])
    logits = np.concatenate([pick(p, "logits") for p in packs])
    test_logits = np.concatenate([pick(p, "test_logits") for p in packs])
    models = np.concatenate([p["models"] for p in packs])
    if not np.array_equal(models, np.arange(keep.shape[0])):
        raise ValueError(f"signals {store.fingerprint}: packs hold models {models.tolist()}, expected 0..{keep.shape[0] - 1}")
    return Signals(logits=logits, labels=labels, keep=keep, pop_logits=test_logits, pop_labels=test_labels)


def attacker_view(spec: AuditSpec, signals):
    """The bank's signals as the spec's attacker uses them: a non-adaptive attacker's shadows are the
    undefended models only (`shadow_pool` leaves the defended targets out); an adaptive one's, every model."""
    if spec.attacker != "non_adaptive":
        return signals
    pool = np.ones(spec.plan.num_models, dtype=bool)
    pool[spec.plan.target_list] = False
    return replace(signals, shadow_pool=pool)


def spec_of(of) -> AuditSpec:
    """The spec of an audit given as `read_signals` takes it: an `AuditResult`, a report folder (or its
    result.json: the spec.yaml beside it), or anything `run_audit` accepts."""
    from raymia.resolve import as_spec

    if isinstance(of, str | Path) and (Path(of).name == "result.json" or (Path(of) / "spec.yaml").is_file()):
        of = (Path(of).parent if Path(of).name == "result.json" else Path(of)) / "spec.yaml"  # a report's own
    return of.spec if isinstance(of, AuditResult) else as_spec(of)


def read_signals(of, output_dir: str | Path | None = None, raw: bool = False):
    """The stored signals (`raymia.signals.Signals`: every model's outputs, the membership matrix `keep`) of
    an audit's bank: `of` is an `AuditResult`, an audit's report folder (or its result.json: the spec.yaml
    beside it is read), or anything `run_audit` accepts. With `target:` the user's
    model is the last row (attack it as target `signals.num_models - 1`), on the points it answers; with
    `attacker: non_adaptive` the shadow pool is the audit's (the undefended models), so an attack run on
    them scores as the audit's did. `raw`: the outputs before the defense's post-processing (a spec with
    `metrics.raw_outputs`). Reads the store and trains nothing; a bank that is not wholly stored is a RaymiaError that says how to build it."""
    from raymia.errors import RaymiaError
    from raymia.train.bank import BankContext

    spec = spec_of(of)
    out = str(Path(output_dir or spec.output_dir).resolve())
    spec = spec.model_copy(update={"output_dir": out})
    if raw and not spec.metrics.raw_outputs:
        raise RaymiaError("raw signals are stored only by a bank with metrics.raw_outputs: true; audit the spec "
                          "with it set first", where="metrics.raw_outputs")
    ctx = BankContext.from_spec(spec, setup=False)
    store = SignalStore(spec.store or out, spec.fingerprint(), spec.bank.pack_size, spec.plan.num_models,
                        spec.pack_fingerprints())
    missing = [p for p in range(store.num_packs) if store.check_pack(p) is not None]
    if missing:
        raise RaymiaError(f"signals {store.fingerprint} in {store.root} lack packs {missing}; run the audit first "
                          "(raymia.run_audit(spec) or `raymia audit SPEC`)")
    signals = attacker_view(spec, load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy(), raw=raw))
    if spec.target is not None:  # the user's model as the last row, as the audit attacked it
        from raymia.target import load_target, with_target

        signals = with_target(signals, load_target(spec, ctx))
    return signals


def load_ood_logits(store: SignalStore) -> np.ndarray:
    """The non-member sets' outputs of every bank model, [M, Q, N, C] (the packs' `ood_logits`)."""
    return np.concatenate([store.read_pack(p)["ood_logits"] for p in range(store.num_packs)])


def run_name(spec: AuditSpec) -> str:
    """`<name>-<fingerprint>`, and with `target:` `-<its digest>` (`target.target_digest`): the audit's report
    folder and MLflow run name. The bank's fingerprint leaves the target out, so two targets audited against
    one bank share the bank but not the report."""
    if spec.target is None:
        return f"{spec.name}-{spec.fingerprint()}"
    from raymia.target import target_digest

    return f"{spec.name}-{spec.fingerprint()}-{target_digest(spec)}"


def audit_dir(spec: AuditSpec, output_dir: str | Path | None = None) -> Path:
    return Path(output_dir or spec.output_dir) / "audits" / run_name(spec)


@as_found
def run_audit(
    spec: AuditSpec | dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    output_dir: str | Path | None = None,
    track: bool | None = None,
    console: bool = True,
    run_dir: str | Path | None = None,
    pool=None,
    page: bool = True,
    checked: bool = False,
) -> AuditResult:
    """Run one audit end to end; `spec` is a spec object, a dict, a YAML file's path or None (defaults),
    `overrides` the CLI's `dotted.key=value` strings; returns its `AuditResult`. `output_dir` overrides
    spec.output_dir; `track` overrides tracking.enabled (log to MLflow); `console=False` prints no table;
    `run_dir` is where the report goes (default: <output_dir>/audits/<name>-<fingerprint>); `pool` is a running
    `engine.pool.BankPool` to train on (a sweep's), else the audit starts its own when it must train.
    `page=False` leaves out histograms.png and report.html (a sweep's trials: `raymia report` draws them
    from the trial's folder when asked). `checked=True` says the caller has checked the model against the
    data already (a sweep's trial: `validate_sweep`), which the audit then does not repeat."""
    from raymia.resolve import as_spec
    from raymia.train.bank import BankContext, raw_sets

    spec = as_spec(spec, overrides)
    t0 = time.perf_counter()
    root = Path(output_dir or spec.output_dir)
    check_locations(spec, root)
    # workers (other processes, other nodes) and defenses store and cache under these: absolute
    spec = spec.model_copy(update={"output_dir": str(root.resolve()), "store": absolute(spec.store)})
    out = Path(run_dir) if run_dir else audit_dir(spec, root)
    out.mkdir(parents=True, exist_ok=True)

    # validates data/plan/defense against each other before any training
    ctx = BankContext.from_spec(spec, check_model=not checked)
    if not checked and (why := ctx.defense.inert(spec.train)):  # a sweep's trial lies on its searched range
        log.warning("defense %s: %s, so this audit measures the undefended model under the defense's name",
                    spec.defense.name, why)
    if spec.gate and spec.target is None:  # a gate on a rate the plan cannot resolve could never pass
        from raymia.metric_names import check_resolvable

        check_resolvable(spec, ctx.plan.keep, [g.metric for g in spec.gate], "gate")
    tracking_ready = None
    if spec.tracking.enabled if track is None else track:
        from raymia.tracking import check_reachable, probe_tracking

        probe_tracking(spec.tracking.uri)  # a server that does not answer: one line at once
        # MLflow's import and its store's opening take seconds: they overlap Ray's and the pool's start, and a
        # store that cannot be opened still stops the audit before anything trains (ensure_bank waits for it)
        tracking_ready = in_daemon_thread(check_reachable, spec.tracking.uri, spec.tracking.experiment)
    external = None
    if spec.target is not None:  # the user's model: read, checked and queried before any training
        from raymia.target import load_target

        external = load_target(spec, ctx)
    inversion_data = None
    if spec.inversion is not None:  # the class split and the attacker's public data, before any training
        from raymia.inversion.protocol import inversion_data as load_inversion_data

        inversion_data = load_inversion_data(spec, ctx)
    store = SignalStore(spec.store or root, spec.fingerprint(), spec.bank.pack_size, spec.plan.num_models,
                        spec.pack_fingerprints())
    reused = ensure_bank(spec, store, pool, before_training=tracking_ready.result if tracking_ready else None)
    if tracking_ready is not None:
        tracking_ready.result()
    signals = attacker_view(spec, load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy()))
    targets, population = spec.plan.target_list, ctx.plan.population
    if external is not None:  # the user's model joins as row M, every bank model its shadow
        from raymia.target import with_target

        signals, targets, population = with_target(signals, external), [spec.plan.num_models], population[external.points]
    utility, utility_std = measure_utility(signals, targets, spec.plan.num_models)
    defense_report = _defense_report(store, ctx.defense)
    # An (eps, delta) guarantee is audited at its own delta (DP-SGD states one per model); a user's own
    # target comes with none, so its bound is the pure-DP one.
    delta = defense_report.get("delta", 0.0) if external is None else 0.0
    attacks, attacks_std, per_target, curves, scores = run_attacks(spec, attacks_to_run(spec, ctx.defense),
                                                                   signals, targets, delta=delta)
    raw_attacks = raw_std = None
    if spec.metrics.raw_outputs:
        raw_attacks, raw_std = attacks, attacks_std  # nothing post-processed: the released outputs are raw
        if raw_sets(ctx):  # never with `target:` (load_target refuses a defense that post-processes)
            raw = load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy(), raw=True)
            raw = replace(signals, logits=raw.logits, pop_logits=raw.pop_logits)  # the same shadow pool
            raw_attacks, raw_std, _, raw_curves, _ = run_attacks(spec, attacks_to_run(spec, ctx.defense), raw, targets,
                                                                 delta=delta)
            curves.update({f"raw/{a}": c for a, c in raw_curves.items()})  # roc.png draws them dashed
    ood = None
    if spec.ood is not None:
        from raymia.ood_audit import evaluate_ood

        ood = evaluate_ood(attacks_to_run(spec, ctx.defense), signals, load_ood_logits(store), ctx.ood.y.numpy(),
                           ctx.ood.slices(), dict(zip(ctx.ood.keys, ctx.ood.label_sources, strict=True)),
                           targets)
    inversion = None
    if spec.inversion is not None:
        from raymia.inversion.protocol import run_inversions

        inversion = run_inversions(spec, ctx, out, inversion_data)
    result = AuditResult(
        spec=spec, fingerprint=store.fingerprint, attacks=attacks, attacks_std=attacks_std,
        per_target=per_target, defense_report=defense_report, utility=utility,
        utility_std=utility_std, reused_signals=reused, out_dir=out, roc=curves,
        seconds=time.perf_counter() - t0, inversion=inversion, ood=ood, targets=targets,
        target=external.describe() if external is not None else None,
        raw_attacks=raw_attacks, raw_attacks_std=raw_std,
        points=PointScores(index=population, label=signals.labels, member=signals.keep[targets],
                           scores=scores, targets=targets),
    )
    result.gate = check_gate(spec.gate, result.flat_metrics())
    if result.seconds >= ATTACK_PROGRESS_AFTER_S:  # a long audit's report (every point's scores) takes a while too
        from raymia.report.text import duration

        log.info("report: attacks done after %s; writing result.json, records.parquet and the figures to %s",
                 duration(result.seconds), out)
    write_report(result, console=console, track=spec.tracking.enabled if track is None else track, page=page,
                 store=store)
    if failed := result.gate_failures:  # the last line a CI's log shows
        log.warning("gate: %d of %d condition(s) failed: %s", len(failed), len(result.gate),
                    "; ".join(gate_line(g) for g in failed))
    return result


def ensure_bank(spec: AuditSpec, store: SignalStore, pool=None, before_training=None) -> bool:
    """Train the packs of the bank that the store lacks (on `pool`, or a warm pool started for this audit,
    or in this process with `bank.engine: local`); True when every pack was already stored.
    `before_training()`, where given, is called once a pool of this audit's own has started and before
    anything is written or trained (it raises to stop the audit there)."""
    missing = store.missing_packs()
    fp, n_packs = store.fingerprint, store.num_packs
    if not missing:
        log.info("reusing stored signals %s (%d packs, %d models): no training needed", fp, n_packs,
                 spec.plan.num_models)
        return True
    own = None
    if spec.bank.engine != "local" and pool is None:  # a sweep's pool: run_sweep checked its names
        from raymia.engine.pool import BankPool
        from raymia.resolve import check_workers_know

        check_workers_know(spec)
        own = pool = BankPool.start(spec)  # returns at once: its workers warm up while the lines below run
    try:
        if before_training is not None:
            before_training()
        store.write_spec(spec.bank_dict())
        if len(missing) < n_packs:
            log.info("reusing %d of %d stored packs of signals %s", n_packs - len(missing), n_packs, fp)
            # the two ways agree to float tolerance only: the rest of the bank trains the way its stored packs did
            stored = store.trained_vectorized(missing) if spec.bank.vectorize == "auto" else None
            if stored is not None:
                spec = spec.model_copy(update={"bank": spec.bank.model_copy(update={"vectorize": stored})})
                log.info("bank: %s, as its stored packs trained", "vectorised packs" if stored else "one model at a time")
        if spec.bank.engine == "local":
            from raymia.engine.bank_job import build_bank_locally

            log.info("training %d pack(s) in this process", len(missing))
            build_bank_locally(spec, store, missing)
        elif own is not None:
            own.run(spec, store, missing)
        else:
            from raymia.engine.bank_job import current_prefix

            pool.run(spec, store, missing, prefix=current_prefix())
    finally:
        if own is not None:
            own.shutdown()
    still = store.missing_packs()
    if still:
        raise RuntimeError(f"bank job finished but packs {still} of signals {fp} are missing")
    return False


def measure_utility(signals, targets: list[int], bank_models: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Utility of the attacked models, measured on what a querier sees (identity query): the mean and the
    std over targets of each of TARGET_UTILITY, and BANK_UTILITY over the first `bank_models` models (every
    model by default; the bank's without the user's own target)."""
    from raymia.metrics import accuracy, ece

    labels, y_test = signals.labels, signals.pop_labels
    test_logits = signals.pop_logits[:, 0]
    tr_acc = [accuracy(signals.logits[t, 0, signals.keep[t]], labels[signals.keep[t]]) for t in targets]
    te_acc = [accuracy(test_logits[t], y_test) for t in targets]
    gap = list(np.subtract(tr_acc, te_acc))
    test_ece = [ece(test_logits[t], y_test) for t in targets]
    per_target = dict(zip(TARGET_UTILITY, (tr_acc, te_acc, gap, test_ece), strict=True))  # in its order
    utility = {k: float(np.mean(v)) for k, v in per_target.items()}
    utility_std = {k: float(np.std(v)) for k, v in per_target.items()}
    bank = range(bank_models or len(test_logits))
    utility[BANK_UTILITY] = float(np.mean([accuracy(test_logits[m], y_test) for m in bank]))
    return utility, utility_std


# The attacks of a small audit take a second and say nothing; a large one (256 targets, learned attacks) can
# take many minutes: from this many seconds on, a progress line at most every ATTACK_PROGRESS_EVERY_S, and
# one line before the report of an audit that has run this long.
ATTACK_PROGRESS_AFTER_S = 10.0
ATTACK_PROGRESS_EVERY_S = 30.0


def run_attacks(spec: AuditSpec, attacks: list, signals, targets: list[int] | None = None, delta: float = 0.0):
    """Every attack against every target (default: plan.targets): (mean, std over targets, per-target
    metrics, the first target's ROC curve, the scores float64 [targets, P]), each keyed by the attack's
    label (default: its name). `delta`: that of the epsilon lower bound (the targets' stated guarantee's)."""
    from raymia import progress
    from raymia.attacks import run_attack
    from raymia.engine.bank_job import current_prefix
    from raymia.metrics import full_metrics, roc
    from raymia.report.text import duration

    m = spec.metrics
    mean: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    per_target: dict[str, list[dict[str, float | None]]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    all_scores: dict[str, np.ndarray] = {}
    targets = spec.plan.target_list if targets is None else targets
    t0, next_line = time.perf_counter(), ATTACK_PROGRESS_AFTER_S
    with progress.bar(f"{current_prefix()}attacks x targets", len(attacks) * len(targets)) as shown:
        for i, a in enumerate(attacks):
            runs, per = [], []
            for j, t in enumerate(targets):
                if (spent := time.perf_counter() - t0) >= next_line:
                    log.info("attacks: %s on target %d of %d (attack %d of %d), %s so far", a.key, j + 1,
                             len(targets), i + 1, len(attacks), duration(spent))
                    next_line = spent + ATTACK_PROGRESS_EVERY_S
                scores = run_attack(a.name, a.params, signals, t, where=f"attacks.{i}")
                per.append(np.asarray(scores, dtype=np.float64))
                is_member = signals.keep[t]
                runs.append(full_metrics(scores, is_member, fpr_levels=tuple(m.fpr_levels),
                                         fnr_levels=tuple(m.fnr_levels), n_boot=m.bootstrap, seed=spec.seed,
                                         delta=delta))
                if j == 0:
                    fpr, tpr, _ = roc(scores, is_member)
                    curves[a.key] = (fpr, tpr)
                shown.advance()
            signals.forget_derived()  # this attack's per-model transforms, shared by its targets
            mean[a.key], std[a.key] = _mean_std(runs)
            per_target[a.key] = runs
            all_scores[a.key] = np.stack(per)
    return mean, std, per_target, curves, all_scores


def write_report(result: AuditResult, console: bool, track: bool, page: bool = True,
                 store: SignalStore | None = None) -> None:
    """In the audit's folder: result.json, spec.yaml, roc.png, with the attacks' scores records.parquet,
    vulnerable.csv and histograms.png, and report.html (all of them on one page); the table on the console;
    the MLflow run, with `tracking.log_signals` the bank's stored signals (`store`) among its artifacts."""
    from raymia.report.plots import attack_colours, plot_roc

    spec, out, fp = result.spec, result.out_dir, result.fingerprint
    _say_replaced(out / "spec.yaml", spec)
    for old in report_files(out):  # a replaced report's files (an OOD figure, histograms) must not stay and be logged
        if not old.name.startswith("inversion-"):  # the inversions of this audit drew their grids already
            old.unlink()
    write_spec_file(spec, out / "spec.yaml", f"the spec of audit {spec.name}-{fp}")
    plot_roc(result.roc, out / "roc.png", title=roc_title(spec, result.targets[0]))
    if result.points is not None:  # every point's scores, the members that leak most, their histograms
        from raymia.report.plots import HISTOGRAMS_FILE, histograms_title, plot_histograms
        from raymia.report.records import RECORDS_FILE, VULNERABLE_FILE, write_records, write_vulnerable

        write_records(result.points, out / RECORDS_FILE)
        write_vulnerable(result.vulnerable, out / VULNERABLE_FILE)
        if page:
            plot_histograms(result.points, out / HISTOGRAMS_FILE, title=histograms_title(spec.name))
    if result.ood is not None:
        from raymia.report.plots import plot_ood

        plot_ood(result.ood, out / "ood_fpr.png", title=f"{spec.name}: false positives by set",
                 colours=attack_colours(result.roc))  # each attack in its roc.png colour
    # result.json last, in one atomic write: a sweep's resume takes a trial folder that holds it for a finished
    # trial (`sweep._finished_trial`), so a kill before it must leave none, and a kill during it no torn one
    from raymia.storage import LocalFiles

    LocalFiles(out).write("result.json", json.dumps(result.to_json(), indent=1).encode())
    if page:
        from raymia.report.html import write_html

        write_html(out)
    if console:
        print_audit_table(result)
    if track:
        from raymia.tracking import KIND_AUDIT, TAG_FINGERPRINT, TAG_KIND, drop_interrupted, log_run

        tags = {TAG_KIND: KIND_AUDIT, TAG_FINGERPRINT: fp}
        if result.gate:
            tags["raymia.gate"] = "failed" if result.gate_failures else "passed"
        try:
            if drop_interrupted(spec.tracking.uri, spec.tracking.experiment, run_name(spec), tags):
                log.info("MLflow: replacing the run of this audit that an interruption left open")
            with _staged_signals(store if spec.tracking.log_signals else None) as tree:
                rid = log_run(
                    spec.tracking.uri, spec.tracking.experiment, run_name=run_name(spec),
                    params=spec.model_dump(mode="json"), metrics=result.flat_metrics(),
                    artifacts=report_files(out), tags=tags,
                    start_time=time.time() - result.seconds, dataset=(spec.data.name, fp), tree=tree,
                )
        except Exception as e:  # the results are on disk already: say so in one line, lose nothing
            from raymia.errors import first_line

            log.error("MLflow: the audit's results are on disk in %s but not in MLflow (%s): %s", out,
                      spec.tracking.uri, first_line(e))
            return
        from raymia.tracking import run_address

        log.info("MLflow: %s", run_address(spec.tracking.uri, rid))


@contextlib.contextmanager
def _staged_signals(store: SignalStore | None):
    """The store's files (`SignalStore.stored_files`: signals/<fingerprint>/...) copied into a temporary
    folder with the store's layout, for MLflow to upload from any store, a URI's included (one copy of the
    signals on local disk while they upload); None without a store."""
    if store is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="raymia-signals-") as tmp:
        for rel in store.stored_files():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.files.read(rel))
        yield Path(tmp)


def report_files(folder: Path) -> list[Path]:
    """The files of an audit's report in `folder` (those that are there) that its MLflow run keeps: the one
    list for a stand-alone audit, a sweep's trial and a final audit."""
    from raymia.report.html import REPORT_FILE
    from raymia.report.plots import HISTOGRAMS_FILE, SHADOWS_CSV, SHADOWS_PNG
    from raymia.report.records import RECORDS_FILE, VULNERABLE_FILE

    names = ("result.json", "spec.yaml", "roc.png", REPORT_FILE, RECORDS_FILE, VULNERABLE_FILE, HISTOGRAMS_FILE,
             "ood_fpr.png", SHADOWS_PNG, SHADOWS_CSV)
    return [folder / n for n in names if (folder / n).is_file()] + sorted(folder.glob("inversion-*.png"))


def attacks_to_run(spec: AuditSpec, defense) -> list:
    """The spec's attacks, plus the calibrated label-only attack when the defense changes the released
    outputs and the spec lists none (`metrics.label_only_for_output_defenses`): score-based attacks are
    what such a defense is built to blunt, and the predicted label it keeps still leaks."""
    from raymia.spec import AttackSpec

    attacks = list(spec.attacks)
    if (spec.metrics.label_only_for_output_defenses and defense.modifies_outputs
            and not any("label_only" in (a.name, a.key) for a in attacks)):
        attacks.append(AttackSpec(name="label_only", params={"calibrated": True}))
    return attacks


def _say_replaced(path: Path, spec: AuditSpec) -> None:
    """A warning when the folder holds the report of an audit of the same signals under another setting
    (other attacks or metrics: the folder is named by the signals): that report is about to be replaced."""
    import yaml

    from raymia.spec import changed_fields

    try:
        before = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 (damaged)
        return
    if not isinstance(before, dict):  # damaged or edited: nothing to compare, the report is replaced anyway
        return
    # where it ran and how the bank was trained (engine, workers, packs; precision is in the fingerprint, so
    # in the folder's name) change no number of the report
    skip = ("output_dir", "store", "tracking", "bank")
    changed = changed_fields({k: v for k, v in before.items() if k not in skip},
                             {k: v for k, v in spec.model_dump(mode="json").items() if k not in skip})
    if changed:
        log.warning("%s held the report of an audit of these signals with other %s; it is replaced (its MLflow "
                    "run, if tracked, keeps it)", path.parent, ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else ""))


def write_spec_file(spec: AuditSpec, path: Path, what: str) -> Path:
    """The spec as run, every default filled in, as YAML that `raymia audit` (or `sweep`) reads back to the
    same fingerprint: beside a report and in its MLflow run, so a run can be repeated from either."""
    import yaml

    header = (f"# {what} (raymia {__version__}), every field as run.\n"
              f"# `raymia {'sweep' if isinstance(spec, SweepSpec) else 'audit'} {path.name}` runs it again (add --output-dir "
              "to store elsewhere).\n")
    d = spec.model_dump(mode="json")
    if d.get("sweep", {}).get("defenses"):  # several searched defenses: defense/space are unused (and refused)
        d["sweep"].pop("defense")
        d["sweep"].pop("space")
    from raymia.storage import LocalFiles

    LocalFiles(path.parent).write(path.name, (header + yaml.safe_dump(d, sort_keys=False)).encode())
    return path


def _defense_report(store: SignalStore, defense) -> dict[str, float]:
    """Mean over the bank of what the defense measured per model, plus its stated guarantee."""
    reports = [r for p in range(store.num_packs) for r in store.read_meta(p).get("defense_reports", [])]
    keys = sorted({k for r in reports for k in r})
    out = {k: float(np.mean([r[k] for r in reports if k in r])) for k in keys}
    for k, v in (defense.privacy_guarantee() or {}).items():
        if isinstance(v, int | float):
            out[k] = float(v)
    return out


def _mean_std(runs: list[dict[str, float | None]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        if any(v is None for v in vals):
            mean[k] = std[k] = None
        else:
            mean[k] = float(np.mean(vals))
            std[k] = float(np.std(vals))
    return mean, std


def roc_title(spec: AuditSpec, target: int) -> str:
    """roc.png's title: the audit, its defense setting, the bank, and the target whose curves it draws."""
    setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.defense.params.items())
    defense = "no defense" if spec.defense.name == "none" else spec.defense.name
    return (f"{spec.name}: {defense}" + (f" ({setting})" if setting else "")
            + f", {spec.plan.num_models} models; target {target}")


def fmt(v: float | None, pct: bool = False) -> str:
    if v is None or v != v:  # None or NaN: undefined
        return "n/a"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def attack_cell(ms: dict[str, float | None], sd: float | None, key: str, many: bool) -> str:
    """One attack's metric as the console table and `AuditResult`'s repr write it: a percent for rates and
    accuracies (`metrics.shown_as_percent`), "± std" over several targets, the bootstrap interval."""
    from raymia.metrics import shown_as_percent

    pct = shown_as_percent(key)
    cell = fmt(ms.get(key), pct=pct)
    if many and sd is not None:
        cell += f" ± {fmt(sd, pct=pct)}"
    lo, hi = ms.get(f"{key}_ci_low"), ms.get(f"{key}_ci_high")
    if lo is not None and hi is not None:
        cell += f" [{fmt(lo, pct=pct)}, {fmt(hi, pct=pct)}]"
    return cell


def utility_line(u: dict[str, float]) -> str:
    return (f"utility: train acc {fmt(u['train_accuracy'], True)}  test acc {fmt(u['test_accuracy'], True)}  "
            f"gap {fmt(u['generalization_gap'], True)}  test ECE {fmt(u['test_ece'])}")


def print_audit_table(result: AuditResult) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from raymia.metrics import metric_label, table_columns, unresolved_note

    spec = result.spec
    keys, unresolved = table_columns(result.attacks)
    n_targets = len(result.targets)
    who = (f"target=yours ({result.target['source']})  shadows={spec.plan.num_models}" if result.target
           else f"models={spec.plan.num_models}  targets={n_targets}")
    over = "  (mean ± std over targets)" if n_targets > 1 else ""

    def table(title: str, attacks: dict, attacks_std: dict) -> Table:
        t = Table(title=title)
        t.add_column("attack")
        for k in keys:
            t.add_column(metric_label(k), justify="right")
        for a, ms in attacks.items():
            t.add_row(a, *[attack_cell(ms, attacks_std[a].get(k), k, n_targets > 1) for k in keys])
        return t

    import sys

    c = Console(width=None if sys.stdout.isatty() else 200, markup=False, emoji=False)  # names print as given
    c.print(table(f"{spec.name} [{result.fingerprint}]  defense={spec.defense.name}  {who}{over}",
                  result.attacks, result.attacks_std))
    if unresolved:
        c.print(unresolved_note(unresolved), soft_wrap=True)
    # the same comparison as report.html's, which reads them back from result.json
    if result.raw_attacks is not None and result.raw_attacks != result.attacks:
        c.print(table(f"the same models' outputs before {spec.defense.name}'s post-processing (raw/){over}",
                      result.raw_attacks, result.raw_attacks_std or {}))
    elif result.raw_attacks is not None:
        c.print(f"raw/: {spec.defense.name} post-processes no output here, so the raw outputs are the released ones")
    c.print(utility_line(result.utility))
    if result.gate:
        failed = result.gate_failures
        c.print(f"gate: {'failed' if failed else 'passed'} ({len(result.gate) - len(failed)} of {len(result.gate)} "
                "conditions hold)" + "".join(f"\n  {'ok  ' if g['passed'] else 'FAIL'} {gate_line(g)}"
                                             for g in result.gate))
    if result.defense_report:
        c.print("defense: " + "  ".join(f"{k} {v:.4g}" for k, v in result.defense_report.items()))
    if result.ood is not None:
        print_ood_table(result.ood, c)
    inv = result.inversion
    if inv is not None:
        mi = Table(title=f"model inversion: {len(inv.evaluator['classes'])} private classes, "
                         f"targets {inv.targets}, scored by an independent {inv.evaluator['model']}")
        for col in ("attack", "top-1", "top-5", "KNN dist", "FID (evaluator features)"):
            mi.add_column(col, justify="left" if col == "attack" else "right")
        from raymia.inversion.protocol import MI_METRICS

        strongest = {k: inv.strongest(k) for k in MI_METRICS} if len(inv.attacks) > 1 else {}

        def cell(a: str, k: str, text: str) -> Text:
            return Text(text, style="bold" if strongest.get(k) == a else "")

        for a, ms in inv.attacks.items():
            mi.add_row(a, cell(a, "top1", fmt(ms["top1"], True)), cell(a, "top5", fmt(ms["top5"], True)),
                       cell(a, "knn_dist", f"{ms['knn_dist']:.3g}"), cell(a, "fid", f"{ms['fid']:.4g}"))
        if strongest:
            mi.caption = "bold: the strongest attack on each metric (mi/worst/...)"
        c.print(mi)
    c.print(f"report: {result.out_dir / 'report.html'}", soft_wrap=True)


def print_ood_table(ood, console) -> None:
    """Per attack and non-member set: the FPR at the attack's shadow-calibrated threshold and the AUROC."""
    from rich.table import Table

    table = Table(title="false positives: FPR at the attack's calibrated threshold / AUROC against the members")
    table.add_column("attack")
    table.add_column("recall", justify="right")
    for st in ood.sets:
        table.add_column(f"{st} ({ood.label_sources[st]} labels)" if st != "held_out" else st, justify="right")
    for a, per_set in ood.attacks.items():
        cells = [f"{fmt(per_set[st]['fpr'], True)} / {fmt(per_set[st]['auroc'])}" for st in ood.sets]
        table.add_row(a, fmt(ood.recall[a], True), *cells)
    console.print(table)
    if ood.skipped:
        console.print("not evaluated: " + "; ".join(f"{a} ({why})" for a, why in ood.skipped.items()))
