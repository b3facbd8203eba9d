"""`raymia check SPEC`: validate a spec exactly as `raymia audit` / `raymia sweep` would before their first
step, and say what it would run and what is already done, without training anything.

It loads the data, draws the membership plan, builds the model and the defense (fitting nothing: a VAE or
a pretrained backbone waits for the real run) and, for a sweep, resolves the search space and checks the
objectives; then it reads the signal store (which packs of the bank are stored and intact) and the sweep's
folder (how many trials finished). It needs neither Ray nor MLflow nor Optuna, so it also runs on a machine
that has only the compute core.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from raymia.report.text import duration, first_of
from raymia.resolve import validate_spec
from raymia.spec import AuditSpec, SweepSpec, apply_overrides, load_raw


@dataclass
class CheckReport:
    """What `raymia check` found: `rows` are (label, text) lines; the fields are for programs and tests."""

    kind: str  # "audit" or "sweep"
    spec: AuditSpec
    fingerprint: str
    packs: int
    stored: list[int] | None  # audits only: the packs stored and intact
    invalid: dict[int, str] | None  # audits only: pack -> why it will be rebuilt
    signal_bytes: int = 0  # the size of the bank's signals (an audit's; each sweep trial's)
    trials_done: int | None = None  # sweeps only
    rows: list[tuple[str, str]] = field(default_factory=list)


def _n(x: int) -> str:
    return f"{x:,}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM: the unit of the compute row's lower bound


def _guarantee(defense, lo: int, hi: int, recipe) -> str | None:
    """The accountant's epsilon for the models of `lo` to `hi` members, before any training."""
    few, many = defense.accounted_guarantee(lo, recipe), defense.accounted_guarantee(hi, recipe)
    if few is None:
        return None

    def eps(g: dict[str, float]) -> str:
        return f"{g['epsilon']:.3g}" if math.isfinite(g["epsilon"]) else "infinite (no noise)"

    how = (f"sigma {few['noise_multiplier']:.3g}, sampling rate {few['sampling_rate']:.3g}, "
           f"{int(few['steps'])} steps, delta {few['delta']:.2g}")
    if lo == hi:
        return f"epsilon {eps(few)} per model ({how}), from the accountant before training"
    return (f"epsilon {eps(few)} ({_n(lo)} members: {how}) to {eps(many)} ({_n(hi)} members) per model, "
            "from the accountant before training")


def _flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e6:.3g} MFLOP"


def _lower_bound(seconds: float) -> str:
    return "under a second" if seconds < 1 else f"at least {duration(seconds)}"


def count_flops(model_name: str, model_params: dict, info, batch_size: int) -> tuple[float, float]:
    """(FLOPs of one training step: forward and backward on one batch; FLOPs of one example's eval-mode
    forward), counted by torch's FLOP counter on the meta device: shapes only, no memory, no compute."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from raymia.models import build_model

    with torch.device("meta"):
        model = build_model(model_name, model_params, info)
        x = torch.empty(batch_size, *info.input_shape)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(model.train()(x), y).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as query:
        model.eval()(x[:1])
    return float(train.get_total_flops()), float(query.get_total_flops())


def check_spec(path: str | Path, overrides: list[str] | None = None,
               output_dir: str | Path | None = None, from_trial: int | None = None) -> CheckReport:
    """Validate the spec at `path` (a sweep when it has a `sweep` block, else an audit) and describe it;
    with `from_trial`, the audit of that finished trial of the sweep (`sweep.spec_of_trial`)."""
    from raymia.train.bank import BankContext

    if from_trial is None:
        raw = load_raw(path)
        kind = "sweep" if "sweep" in raw else "audit"
        spec = validate_spec(apply_overrides(raw, overrides), SweepSpec if kind == "sweep" else AuditSpec,
                             where=str(path))
        what = f"{path}: a valid {kind} spec"
    else:
        from raymia.sweep import spec_of_trial

        kind, spec = "audit", spec_of_trial(path, from_trial, overrides or [], output_dir)
        what = f"{path}: trial {from_trial} of the sweep, as an audit"
    from raymia.storage import check_locations

    check_locations(spec, output_dir)
    _check_fits_local_ray(spec)
    space = None
    if isinstance(spec, SweepSpec):
        from raymia.sweep import validate_sweep

        space, ctx = validate_sweep(spec, setup=False)
    else:
        ctx = BankContext.from_spec(spec, setup=False)

    rows: list[tuple[str, str]] = [("spec", f"{what}, name {spec.name!r}, seed {spec.seed}")]
    data, info = ctx.data, ctx.data.info
    rows.append(("data", f"{data.name}: {_n(data.x_train.shape[0])} training and {_n(data.x_test.shape[0])} test "
                         f"points, {info.num_classes} classes, input {list(info.input_shape)} ({info.kind})"))
    rows += _model_and_training_rows(spec, ctx, kind)
    if spec.target is not None:  # the user's files read and checked (the checkpoint queried) as the audit will
        from raymia.target import load_target

        own = load_target(spec, ctx)
        source = (f"checkpoint {spec.target.checkpoint} (fits {spec.model.name})" if own.source == "checkpoint"
                  else f"outputs {spec.target.outputs}")
        rows.append(("target", f"yours, from {source}: {_n(int(own.member.sum()))} members among the "
                               f"{_n(own.points.size)} audited points it answers, {own.queries.size} query(ies); "
                               f"the {ctx.plan.num_models} bank models are all its shadows"))
    # float32 logits of every model under every query, for the audited points and the test split
    m, points = ctx.plan.num_models, ctx.plan.keep.shape[1]
    ood = len(spec.ood.sets) * spec.ood.size if spec.ood is not None else 0  # non-member sets' outputs too
    # with raw_outputs, the first two again where the defense post-processes (a sweep's: where one may)
    raw = 2 if spec.metrics.raw_outputs and (kind == "sweep" or ctx.defense.modifies_outputs) else 1
    signal_bytes = 4 * m * len(spec.queries) * (raw * (points + data.x_test.shape[0]) + ood) * info.num_classes
    if spec.ood is not None:
        rows.append(("ood", f"{len(spec.ood.sets)} non-member set(s) of {_n(spec.ood.size)} inputs each, "
                            f"queried by every model: {', '.join(st.key for st in spec.ood.sets)}; each attack's "
                            "false positives at its threshold calibrated on a shadow (online attacks left out)"))

    root = Path(output_dir or spec.output_dir)
    fp = spec.fingerprint()
    stored: list[int] | None = None
    invalid: dict[int, str] | None = None
    trials_done = None
    if kind == "audit":  # a sweep's trials each have their own bank: its progress is counted in trials
        stored, invalid, store_rows = _stored_packs(spec, root, fp, signal_bytes)
        rows += store_rows
    else:
        trials_done, sweep_rows = _sweep_rows(spec, space, root, signal_bytes, ctx)
        rows += sweep_rows
    t = spec.tracking
    rows.append(("tracking", f"MLflow {t.uri}, experiment {t.experiment!r}" if t.enabled else "off"))
    return CheckReport(kind=kind, spec=spec, fingerprint=fp, packs=ctx.num_packs, stored=stored,
                       invalid=invalid, signal_bytes=signal_bytes, trials_done=trials_done, rows=rows)


def _model_and_training_rows(spec: AuditSpec, ctx, kind: str) -> list[tuple[str, str]]:
    """The model (parameters, how packs train), the plan, the recipe's steps, the defense, the attacks, the
    FLOPs and the bank's layout."""
    import torch

    from raymia.audit import attacks_to_run
    from raymia.models import build_model
    from raymia.train.bank import PROBE_MARGIN, check_data_init
    from raymia.train.packed import runs_packed

    info, rows = ctx.data.info, []
    with torch.device("meta"):  # structure and sizes only
        model = build_model(spec.model.name, spec.model.params, info)
    check_data_init(ctx, model)
    n_params = sum(p.numel() for p in model.parameters())
    if ctx.trains_itself:
        packing = "one model at a time (" + ("train.function" if spec.train.function is not None
                                             else f"defense {spec.defense.name} trains each model itself") + ")"
    elif spec.bank.vectorize is False:
        packing = "one model at a time (bank.vectorize: false)"
    else:
        auto = spec.bank.vectorize == "auto"
        packing = ("packs train as grouped kernels" if runs_packed(model, info.input_shape)
                   else "packs train under torch.func.vmap" + (" on GPUs, one model at a time on a CPU" if auto else ""))
        if auto:
            packing += f"; a short timing picks the other way only where it is {PROBE_MARGIN}x faster"
    rows.append(("model", f"{spec.model.name}: {_n(n_params)} parameters; {packing}"))
    per_step, per_query = count_flops(spec.model.name, spec.model.params, info, ctx.recipe.batch_size)

    plan, m = ctx.plan, ctx.plan.num_models
    members = plan.keep.sum(axis=1)
    targets = list(plan.targets)
    attacked = ("the shadows of your target" if spec.target is not None else
                f"{len(targets)} attacked ({first_of(targets)})")
    lo, hi = int(members.min()), int(members.max())
    rows.append(("plan", f"{m} models, {attacked}; {_n(plan.keep.shape[1])} audited points, each "
                         f"in the training set of {m // 2} models; {_n(lo)}{'' if lo == hi else f' to {_n(hi)}'} "
                         "members per model"))
    r = ctx.recipe
    steps = r.epochs * ctx.steps_per_epoch
    own_loop = ctx.trains_itself
    rows.append(("training", f"{r.optimizer} lr {r.lr:g}, {r.schedule} schedule, weight decay {r.weight_decay:g}, "
                             f"{r.epochs} epochs x {ctx.steps_per_epoch} steps of {r.batch_size} = {_n(steps)} steps "
                             f"per model, {_n(steps * m)} in all"
                             + (f"; each model trains in {spec.train.function.name} (train.function)"
                                if spec.train.function is not None else
                                "; the defense trains each model in its fit (the step loop with its hooks)"
                                if own_loop else "")))
    params = ctx.defense.params.model_dump(mode="json") if hasattr(ctx.defense.params, "model_dump") else {}
    # A sweep's trials take their defense from the search (its own row); the spec's `defense` is not run.
    chosen = (spec.defense.name + (" " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else "")
              if kind == "audit" else "each trial's, from the search below")
    inert = ctx.defense.inert(spec.train) if kind == "audit" else None
    rows.append(("defense", chosen
                 + ("" if spec.attacker == "adaptive" else "; non-adaptive attacker (undefended shadows)")
                 + (f"; does not act: {inert}, so the audit measures the undefended model" if inert else "")))
    if (guarantee := _guarantee(ctx.defense, lo, hi, r)) is not None:
        rows.append(("privacy", guarantee))
    attacks = attacks_to_run(spec, ctx.defense)
    added = " (label_only added: the defense changes the outputs)" if len(attacks) > len(spec.attacks) else ""
    shadows = ("every bank model is your target's shadow" if spec.target is not None else
               "leave-one-out: each target's shadows are the other models but its pair")
    raw = ("" if not spec.metrics.raw_outputs else "; each also before the defense's post-processing (raw/)"
           if ctx.defense.modifies_outputs or kind != "audit" else
           "; raw/ as released (the defense post-processes no output)")
    rows.append(("attacks", f"{', '.join(a.key for a in attacks)}{added}; queries {', '.join(spec.queries)}; "
                            f"{shadows}{raw}"))
    if spec.gate:
        if spec.target is None:  # as run_audit checks it: a rate the plan cannot resolve would never pass
            from raymia.metric_names import check_resolvable

            check_resolvable(spec, ctx.plan.keep, [g.metric for g in spec.gate], "gate")
        rows.append(("gate", ", ".join(f"{g.metric} {g.op} {g.value:g}" for g in spec.gate)
                     + " (raymia audit exits with status 3 when one fails)"))
    train_flops = per_step * steps * m
    cost = ctx.defense.training_cost(r)
    if cost is not None:
        train_flops *= cost[0]
    query_flops = per_query * m * len(spec.queries) * (plan.keep.shape[1] + ctx.data.x_test.shape[0])
    scope = ("" if kind != "sweep" else " (each trial)" if cost is not None else
             " (each trial at the plain recipe; a defense that trains more says so below)")
    rows.append(("compute", f"{_flops(train_flops)} to train the bank and {_flops(query_flops)} to query it"
                            f"{scope}, counted on the meta device: "
                            f"{_lower_bound((train_flops + query_flops) / H100_BF16_PEAK)} of an H100 at its "
                            f"dense bf16 peak"
                            + (f"; the defense trains {cost[0]:.3g}x the recipe's steps per model ({cost[1]})"
                               if cost is not None else
                               "; the defense's own training loop does more work than these plain steps"
                               if own_loop else "")))
    if spec.inversion is not None:
        rows.append(_inversion_row(spec, ctx, per_step * steps, per_query))
    b = spec.bank
    where = ("in this process" if b.engine == "local"
             else f"on a pool of {b.num_workers} warm Ray worker(s) of {b.cpus_per_worker:g} CPU(s)"
             + (" (checked against the cluster's nodes when the run connects to RAY_ADDRESS)"
                if os.environ.get("RAY_ADDRESS") else ""))
    rows.append(("bank", f"{ctx.num_packs} pack(s) of up to {b.pack_size} models, trained {where}; device "
                         f"{b.device}, precision {b.precision}"))
    return rows


def _check_fits_local_ray(spec: AuditSpec) -> None:
    """The resource requests the run refuses when its Ray starts (`engine.pool.capacity`, `check_trial_cpu`),
    refused here already where the run would start a local Ray on this machine. With RAY_ADDRESS the nodes
    are the cluster's, known only once the run connects."""
    if os.environ.get("RAY_ADDRESS"):
        return
    from raymia.engine.pool import THIS_MACHINE, capacity, check_trial_cpu, local_node, uses_gpu

    nodes = [local_node()]
    sweep = spec.sweep if isinstance(spec, SweepSpec) else None
    if sweep is not None:
        check_trial_cpu(sweep.trial_cpu, nodes, on=THIS_MACHINE)
    b = spec.bank
    if b.engine == "ray":
        capacity(b.cpus_per_worker, 1 if uses_gpu(b.device, nodes[0]["GPU"]) else 0,
                 sweep.trial_cpu * sweep.max_concurrent if sweep is not None else 0.0, nodes, on=THIS_MACHINE)


def _inversion_row(spec: AuditSpec, ctx, train_flops: float, target_forward: float) -> tuple[str, str]:
    """The inversion's FLOPs: the white-box targets retrained alone, the evaluator, every attack (its GAN
    included) per target; counted on the meta device like the bank's."""
    from raymia.inversion.protocol import evaluator_arch, inversion_data
    from raymia.inversion.registry import flops_at_most, inversion_flops

    inv = spec.inversion
    data = inversion_data(spec, ctx)
    info, n_targets, k = ctx.data.info, min(inv.targets, len(ctx.plan.targets)), len(data.classes)
    arch, params = evaluator_arch(spec)
    ev_step, _ = count_flops(arch, params, info, 1)
    parts = {"targets": n_targets * train_flops} if spec.target is None else {}  # yours is trained already
    parts["evaluator"] = ev_step * inv.evaluator.epochs * data.private_x.shape[0]
    unknown = []
    for a in inv.attacks:
        f = inversion_flops(a.name, a.params, info, target_forward, k, int(data.public_x.shape[0]))
        if f is None:
            unknown.append(a.key)
        else:
            parts[a.key] = f * n_targets
    total = sum(parts.values())
    bounded = {a.key for a in inv.attacks if flops_at_most(a.name)}
    whom = "your model" if spec.target is not None else f"{n_targets} target(s)"
    return ("inversion", f"{', '.join(a.key for a in inv.attacks)} on {whom}, {k} private classes, "
                         f"{_n(int(data.public_x.shape[0]))} public images: "
                         + ", ".join(f"{name} {'at most ' if name in bounded else ''}{_flops(v)}"
                                     for name, v in parts.items())
                         + f"{' (each trial)' if isinstance(spec, SweepSpec) else ''}; "
                         f"{_lower_bound(total / H100_BF16_PEAK)} of an H100 at its dense bf16 peak"
                         + (f"; no estimate for {', '.join(unknown)}" if unknown else ""))


def _stored_packs(spec: AuditSpec, root: Path, fp: str, signal_bytes: int):
    """(stored packs, {pack: why it is invalid}, rows): the store read, not changed."""
    from raymia.store import SignalStore

    b = spec.bank
    store = SignalStore(spec.store or root, fp, b.pack_size, spec.plan.num_models, spec.pack_fingerprints())
    stored, invalid = [], {}
    for p in range(store.num_packs):
        problem = store.check_pack(p)
        if problem is None:
            stored.append(p)
        elif problem != "absent":
            invalid[p] = problem
    state = ("all stored: the audit trains nothing" if len(stored) == store.num_packs
             else f"{len(stored)} of {store.num_packs} packs stored; the others train on the next run")
    rows = [("signals", f"{fp} under {root / 'signals'}: {state}; {_size(signal_bytes)} in all, which "
                        f"the attacks load whole")]
    rows += [("", f"pack {p}: {why}; it is rebuilt on the next run") for p, why in invalid.items()]
    return stored, invalid, rows


def _sweep_rows(spec: SweepSpec, space, root: Path, signal_bytes: int, ctx) -> tuple[int, list[tuple[str, str]]]:
    """(trials finished, rows): the searched spaces, the sweep's size and objectives, what a searched
    defense's trials train beyond the plain recipe (`Defense.training_cost`) and the epsilon they are
    accounted (DP-SGD's), both at the defense's defaults, its progress."""
    from raymia.space import population_size, startup_trials
    from raymia.sweep_space import count_settings, describe_space
    from raymia.sweep_state import resume_hash

    s = spec.sweep
    rows = [("search", f"{d}: {text}") for d, text in describe_space(space).items()]
    sizing = {"tpe": f", {startup_trials(s.num_trials)} random first", "gp": f", {startup_trials(s.num_trials)} random first",
              "nsga2": f", generations of {population_size(s.num_trials)}"}.get(s.sampler, "")
    rows.append(("sweep", f"{s.num_trials} searched trials"
                          f"{' after the undefended baseline (trial 0)' if s.include_undefended else ''}, "
                          f"{'up to ' if spec.metrics.raw_outputs else ''}{_size(signal_bytes)} of signals "
                          f"each (sampler {s.sampler}{sizing}, "
                          f"{s.max_concurrent} at a time); objectives "
                          + ", ".join(f"{o.metric} ({o.mode}" + ("" if o.reference is None else
                                      f", hypervolume reference {o.reference:g}") + ")" for o in s.objectives)
                          + ("; constraints " + ", ".join(f"{c.metric} {c.op} {c.value:g}" for c in s.constraints)
                             if s.constraints else "")
                          + (f"; front re-audited with {s.final_audit.num_models} models" if s.final_audit else "")))
    from raymia.defenses import DEFENSES, build_defense
    from raymia.space import Domain, describe
    from raymia.sweep_space import space_points

    members = ctx.plan.keep.sum(axis=1)
    per_step, _ = count_flops(spec.model.name, spec.model.params, ctx.data.info, ctx.recipe.batch_size)
    plain = per_step * ctx.recipe.epochs * ctx.steps_per_epoch * ctx.plan.num_models  # a trial's bank, plain recipe
    for d, sp in space.items():  # at the defaults and the space's constants: the searched values may move it
        defense = build_defense(d, {k: v for k, v in sp.items() if not isinstance(v, Domain)}, ctx.data.info)
        if (cost := defense.training_cost(ctx.recipe)) is not None:
            rows.append(("", f"a {d} trial trains {cost[0]:.3g}x the recipe's steps per model at its defaults "
                             f"({cost[1]}): {_flops(plain * cost[0])} to train its bank"))
        recipe = defense.modify_recipe(ctx.recipe)
        if (guarantee := _guarantee(defense, int(members.min()), int(members.max()), recipe)) is not None:
            rows.append(("", f"a {d} trial at its defaults: {guarantee}"))
        # not refused: a range may end where the defense stops acting, and its trials then say how much it gave
        for name, v, which, point in space_points(DEFENSES.get(d).params, sp):
            if (why := build_defense(d, point, ctx.data.info).inert(spec.train)) is None:
                continue
            if name is None:  # the base setting: every end that keeps the others there would repeat it
                shown = ", ".join(f"{k} {point[k]!r}" for k, dom in sp.items() if isinstance(dom, Domain))
                rows.append(("", f"{d} at the space's defaults ({shown}) releases the undefended model: {why}"))
                break
            end = "a choice" if which == "choice" else f"the {which}"
            rows.append(("", f"{d} at {name} {v!r} ({end} of {describe(sp[name], condition=False)}) releases the undefended "
                             f"model: {why}"))
    if (n := count_settings(space)) is not None and n < s.num_trials:
        rows.append(("", f"the space holds {n} setting(s), fewer than the {s.num_trials} trials: the sampler "
                         "will propose some again, and a repeat reuses the stored signals (nothing trains)"))
    from raymia.storage import join, open_root

    keep = open_root(join(spec.store or str(root), "sweeps", spec.name))  # the state, as `raymia sweep` keeps it
    sweep_dir = keep.location
    trials_done = sum(1 for t in keep.subdirs("trials") if keep.size(f"trials/{t}/result.json") is not None)
    state = json.loads(keep.read("state.json")) if keep.size("state.json") is not None else None
    if state is None:
        progress = "not started"
    elif state.get("spec_hash") != resume_hash(spec):
        progress = (f"{sweep_dir} holds a sweep of this name with a different spec: `raymia sweep` refuses "
                    "to mix them; give this one another name, or --fresh to discard the old one")
    elif state.get("finished"):
        progress = f"finished: its result is in {sweep_dir}"
    else:
        progress = f"{trials_done} trial(s) finished; a re-run resumes it"
    rows.append(("progress", progress))
    return trials_done, rows


def print_report(report: CheckReport) -> None:
    width = max(len(label) for label, _ in report.rows)
    for label, text in report.rows:
        print(f"{label:<{width}}  {text}")
