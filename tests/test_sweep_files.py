"""Every ready spec in sweeps/ validates, names registered parts, and its search space resolves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.metric_names import check_metric_names
from raymia.resolve import load_spec
from raymia.space import ActsWhen, Categorical, Int
from raymia.spec import SweepSpec
from raymia.sweep_space import resolve_space, space_points

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def test_there_are_sweeps():
    names = {p.stem for p in SWEEPS}
    assert "quickstart" in names and any(n.startswith("cifar10-") for n in names)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_is_valid(path):
    spec = load_spec(path, kind=SweepSpec)
    space = resolve_space(spec)
    assert space, f"{path.name}: empty search space"
    check_metric_names(spec, [o.metric for o in spec.sweep.objectives], "sweep.objectives")
    suffix = path.stem.split("-", 1)[-1]
    if suffix == "all":
        assert len(space) >= 8, sorted(space)
    elif spec.inversion is not None:  # TL-DMI at several freeze depths beside another defense
        assert "tl_dmi" in space and len(space) >= 2 and spec.sweep.include_undefended
        assert len(space["tl_dmi"]["freeze_depth"].choices) >= 3 and space["tl_dmi"]["freeze"] == "depth"
        assert any(o.metric.startswith("mi/") for o in spec.sweep.objectives)
    elif spec.ood is not None:  # calibration against leakage and the OOD false-positive rate
        assert {"temperature_scaling", "llla"} <= set(space) and spec.sweep.include_undefended
        metrics = {o.metric for o in spec.sweep.objectives}
        assert "test_ece" in metrics and any(m.startswith("ood/") for m in metrics)
    elif path.stem != "quickstart":
        assert suffix == spec.sweep.defense and list(space) == [suffix]
    # every searched defense accepts the spec's model and recipe (e.g. DP-SGD refuses BatchNorm models) and its
    # plan (Defense.check_data: e.g. public data left for a min-max reference set or a VAE) at every point
    # `validate_sweep` checks: the base setting and each searched dimension's ends and choices
    info = {"digits": DataInfo(10, (1, 8, 8), "image"), "cifar10": DataInfo(10, (3, 32, 32), "image"),
            "purchase100": DataInfo(100, (600,), "tabular")}[spec.data.name]
    n_train = {"digits": 1347, "cifar10": 50000, "purchase100": 157859}[spec.data.name]  # 197,324 rows x 0.8
    data = SimpleNamespace(name=spec.data.name, x_train=torch.empty(n_train, 0))
    # with a class split the population is the private classes' points (digits 0-4: 675), the rest public
    population = np.arange(675 if spec.data.private_classes == 5 else spec.plan.population or n_train)
    if spec.data.private_classes is not None:
        assert spec.data.name == "digits" and spec.data.private_classes == 5 and spec.plan.population is None
    for d, sp in space.items():
        for _, _, _, params in space_points(DEFENSES.get(d).params, sp):
            defense = build_defense(d, params, info)
            defense.check(spec.model.name, info, spec.model.params, spec.train)
            defense.check_data(data, population)


def test_several_defenses_in_one_sweep():
    """defenses: each trial picks one defense and samples its own space; params are split back per defense."""
    import optuna

    from raymia.sweep import trial_spec
    from raymia.sweep_space import DefineByRun, split_config

    spec = SweepSpec.model_validate({"sweep": {"defenses": [
        "hamp", {"name": "confidence", "space": {"top_k": {"choices": [1, 2]}}}]}})
    space = resolve_space(spec)
    assert list(space) == ["hamp", "confidence"]
    ask = DefineByRun(space)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen = []
    for _ in range(12):
        t = study.ask()
        const = ask(t)
        config = {**t.params, **const}
        name, params = split_config(config)
        seen.append(name)
        audit = trial_spec(spec.model_dump(mode="json"), config)
        assert audit["defense"] == {"name": name, "params": params} and "sweep" not in audit
        if name == "confidence":
            # top_k 1 releases a one-hot vector: the temperature and the rounding are not drawn beside it
            assert set(params) == ({"top_k"} if params["top_k"] == 1 else {"temperature", "top_k", "decimals"})
        study.tell(t, [0.5, 0.5])
    assert "none" not in seen and {"hamp", "confidence"} <= set(seen)  # the baseline is audited apart
    with pytest.raises(Exception, match="either defense"):
        SweepSpec.model_validate({"sweep": {"defense": "hamp", "defenses": ["confidence"]}})


def test_constraints_keep_trials_off_the_front():
    from raymia.pareto import feasible_front
    from raymia.spec import Constraint, Objective

    objectives = [Objective(metric="test_accuracy", mode="max"), Objective(metric="loss/auc", mode="min")]
    trials = [{"trial": 0, "test_accuracy": 0.95, "loss/auc": 0.70},
              {"trial": 1, "test_accuracy": 0.90, "loss/auc": 0.55},
              {"trial": 2, "test_accuracy": 0.80, "loss/auc": 0.50},
              {"trial": 3, "test_accuracy": 0.85, "loss/auc": 0.60}]  # dominated by trial 1
    assert feasible_front(trials, objectives, []) == {0, 1, 2}
    floor = [Constraint(metric="test_accuracy", op=">=", value=0.85)]
    assert feasible_front(trials, objectives, floor) == {0, 1}
    assert [t["feasible"] for t in trials] == [True, True, False, True]
    assert feasible_front(trials, objectives, [Constraint(metric="missing", op="<=", value=1)]) == set()


def test_a_parameter_is_drawn_only_in_the_modes_that_use_it():
    """Pruning's rho acts only with method: admm (Params.acts_when): a real study with the sweep's TPE never
    suggests it beside magnitude, so the trial's config lacks it and the defense takes its default, and
    suggests it beside admm; the searched-mode condition survives the user's override of rho's range."""
    import optuna

    from raymia.searcher import make_sampler
    from raymia.space import ActsWhen, describe
    from raymia.sweep_space import DefineByRun, split_config

    spec = SweepSpec.model_validate({"sweep": {"defense": "pruning", "space": {"rho": {"choices": [1e-3, 1e-2]}}}})
    space = resolve_space(spec)
    assert space["pruning"]["rho"].when == ActsWhen("method", ("admm",))
    assert describe(space["pruning"]["rho"]) == "{0.001, 0.01} if method: admm"
    ask = DefineByRun(space)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", 0, 16, False))
    methods = []
    for _ in range(16):
        t = study.ask()
        const = ask(t)  # suggests the trial's parameters
        _, params = split_config({**t.params, **const})
        methods.append(params["method"])
        assert ("rho" in params) == (params["method"] == "admm") == ("pruning.rho" in t.params), params
        study.tell(t, [params["sparsity"], params.get("rho", 0.0)])
    assert set(methods) == {"magnitude", "admm"}


def test_a_constant_beside_its_searched_mode_is_left_out_where_the_mode_turns_it_off():
    """confidence's temperature acts only when top_k is not 1: pinned at 2.0 while top_k is searched, a trial
    that draws top_k 1 leaves it out (the defense's default, which that mode ignores too), one that draws 3
    gets 2.0; pinned beside a pinned mode that uses it, every trial gets it."""
    import optuna

    from raymia.sweep_space import DefineByRun, describe_space, split_config

    def trials(space: dict) -> list[dict]:
        resolved = resolve_space(SweepSpec.model_validate({"sweep": {"defense": "confidence", "space": space}}))
        ask = DefineByRun(resolved)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
        out = []
        for _ in range(10):
            t = study.ask()
            const = ask(t)  # suggests the trial's parameters
            out.append(split_config({**t.params, **const})[1])
            study.tell(t, 0.0)
        return out

    drawn = trials({"top_k": {"choices": [1, 3]}, "temperature": 2.0, "decimals": None})
    assert describe_space(resolve_space(SweepSpec.model_validate({"sweep": {"defense": "confidence", "space": {
        "top_k": {"choices": [1, 3]}, "temperature": 2.0}}}))) == {
        "confidence": "temperature 2.0 if top_k not 1, top_k {1, 3}, decimals {None, 1, 2, 3} if top_k: 3"}
    assert {p["top_k"] for p in drawn} == {1, 3}
    for p in drawn:
        assert p == ({"top_k": 1} if p["top_k"] == 1 else {"top_k": 3, "temperature": 2.0, "decimals": None}), p
    pinned = trials({"top_k": 3, "temperature": 2.0, "decimals": None})
    assert pinned == [{"top_k": 3, "temperature": 2.0, "decimals": None}] * 10


def test_a_condition_follows_the_space_the_spec_resolves():
    """A mode the spec adds after its parameter is drawn first; a mode narrowed to the choices that use the
    parameter, or pinned to one, leaves it searched always; a parameter whose mode is not searched has no
    condition."""
    from raymia.sweep_space import count_settings

    def resolved(defense: str, space: dict) -> dict:
        return resolve_space(SweepSpec.model_validate({"sweep": {"defense": defense, "space": space}}))[defense]

    tl = resolved("tl_dmi", {"freeze": {"choices": ["depth", "fraction"]}, "freeze_depth": {"low": 0, "high": 2}})
    assert list(tl) == ["freeze", "freeze_fraction", "pretrain_epochs", "init_trainable", "freeze_depth"]
    assert tl["freeze_fraction"].when == ActsWhen("freeze", ("fraction",))
    assert tl["freeze_depth"].when == ActsWhen("freeze", ("depth",))
    assert tl["pretrain_epochs"].when is None  # weights, its mode, is not searched (null: pretraining)
    assert resolved("pruning", {"method": {"choices": ["admm"]}})["rho"].when is None
    assert resolved("pruning", {"method": "admm"})["rho"].when is None
    lam = resolved("pruning", {"inference_steps": {"low": 1, "high": 3}})["inference_steps"]
    assert lam.when == ActsWhen("minmax_lambda", above=0.0)
    # confidence's top_k 1 releases a one-hot vector: the temperature and the rounding change nothing there
    assert str(DEFENSES.get("confidence").params.acts_when["temperature"]) == "top_k not 1"
    conf = resolved("confidence", {})
    assert list(conf) == ["top_k", "temperature", "decimals"]
    assert conf["temperature"].when == conf["decimals"].when == ActsWhen("top_k", (3, None))
    assert list(resolved("confidence", {"top_k": 1})) == ["top_k"]  # the pinned mode idles the rest
    ranged = resolved("confidence", {"top_k": {"low": 1, "high": 4}, "temperature": {"choices": [1.0, 2.0]},
                                     "decimals": None})
    assert ranged["temperature"].when == ActsWhen("top_k", unless=(1,))
    assert count_settings({"confidence": ranged}) == 1 + 3 * 2  # top_k 1 alone, 2-4 with each temperature


def test_count_settings_counts_each_mode_with_its_own_parameters():
    from raymia.space import ActsWhen, Categorical, Float, Int
    from raymia.sweep_space import count_settings

    space = {"a": {"m": Categorical(("x", "y", "z")), "k": Int(1, 4, when=ActsWhen("m", ("x",))),
                   "c": Categorical((True, False), when=ActsWhen("m", ("x", "y"))), "n": Int(1, 2), "p": 0.5},
             "b": {"lam": Categorical((0.0, 1.0)), "s": Int(1, 3, when=ActsWhen("lam", above=0.0))}}
    # a: m=x 4*2*2, m=y 2*2, m=z 2; b: lam=0 1, lam=1 3
    assert count_settings(space) == 16 + 4 + 2 + 1 + 3
    space["b"]["t"] = Float(0.0, 1.0, when=ActsWhen("lam", above=0.0))
    assert count_settings(space) is None  # a continuous parameter, even in one mode
    pruning = resolve_space(SweepSpec.model_validate({"sweep": {"defense": "pruning", "space": {
        "sparsity": 0.5, "rho": {"choices": [1e-3, 1e-2]}, "minmax_lambda": {"choices": [0.0, 1.0]}}}}))
    assert count_settings(pruning) == (1 + 2) * 2 * 2  # method (rho only with admm) x structure x lambda


@pytest.mark.parametrize("space, message", [
    ({"k": Int(1, 2, when=ActsWhen("m", ("x",))), "m": Categorical(("x", "y"))},
     "k is searched when m: x, but m is not searched before it in the space"),
    ({"m": "x", "k": Int(1, 2, when=ActsWhen("m", ("x",)))},
     "k is searched when m: x, but m is not searched before it in the space"),
    ({"m": Categorical(("x", "y")), "k": Int(1, 2, when=ActsWhen("m", ("w",)))},
     r"k is searched when m: w, but m is \{'x', 'y'\}: the values must be in it"),
    ({"m": Categorical(("x", "y")), "k": Int(1, 2, when=ActsWhen("m", unless=("w",)))},
     r"k is searched when m not w, but m is \{'x', 'y'\}: the values must be in it"),
    ({"m": Int(1, 3), "k": Int(1, 2, when=ActsWhen("m", (7,)))},
     r"k is searched when m: 7, but m is \[1, 3\]: the values must be in it"),
    ({"m": Categorical(("x", "y")), "n": Categorical((0, 1), when=ActsWhen("m", ("x",))),
      "k": Int(1, 2, when=ActsWhen("n", above=0))},
     "k is searched when n > 0, but n is itself searched only when m: x"),
])
def test_a_condition_names_a_mode_searched_before_it(space, message):
    from raymia.sweep_space import DefineByRun

    with pytest.raises(ValueError, match=f"^{message}$"):
        DefineByRun({"d": space})


def test_a_searcher_pickled_when_its_space_lived_in_raymia_sweep_still_loads():
    """Tune pickles the searcher with its DefineByRun in a sweep's resume state; those of sweeps begun before
    it moved to raymia.sweep_space name it raymia.sweep.DefineByRun, and a resume must still draw from them."""
    import pickle

    import optuna

    from raymia.sweep_space import DefineByRun, resolve_space

    ask = DefineByRun(resolve_space(SweepSpec.model_validate({"sweep": {"defense": "hamp"}})))
    old = pickle.dumps(ask, protocol=2)  # names every class as "module\nname" text
    assert b"raymia.sweep_space\nDefineByRun" in old
    loaded = pickle.loads(old.replace(b"raymia.sweep_space\nDefineByRun", b"raymia.sweep\nDefineByRun"))
    assert type(loaded) is DefineByRun and loaded.spaces == ask.spaces
    same = [optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask() for _ in range(2)]
    assert loaded(same[0]) == ask(same[1])


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_runs_two_objectives(sampler):
    import optuna

    from raymia.searcher import make_sampler

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(sampler, 0, 6, False))
    for _ in range(6):
        t = study.ask()
        x = t.suggest_float("x", 0.0, 1.0)
        study.tell(t, [x, x * x])
    assert len(study.best_trials) >= 1


def test_samplers_are_sized_to_the_sweep():
    from raymia.searcher import make_sampler
    from raymia.space import population_size, startup_trials

    # a short sweep is not a random search: TPE and GP model the results after a quarter of it
    assert [startup_trials(n) for n in (1, 8, 20, 40, 400)] == [2, 2, 5, 10, 10]
    assert [population_size(n) for n in (1, 8, 30, 150, 1000)] == [4, 4, 10, 50, 50]
    assert make_sampler("tpe", 0, 8, False)._n_startup_trials == 2
    assert make_sampler("gp", 0, 20, False)._n_startup_trials == 5
    assert make_sampler("nsga2", 0, 30, False)._population_size == 10


def test_constraints_reach_the_sampler_through_tunes_searcher():
    """Driven through the Searcher API Tune calls (suggest, on_trial_complete): each finished trial's
    constraint values are stored on its Optuna trial, the sampler records them, and Optuna's own
    constrained front leaves the infeasible trial out, as raymia's does."""
    from raymia.pareto import feasible_front
    from raymia.searcher import ConstrainedOptunaSearch, make_sampler
    from raymia.spec import Constraint, Objective

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    floor = [Constraint(metric="test_accuracy", op=">=", value=0.9), Constraint(metric="loss/auc", op="<=", value=0.8)]
    search = ConstrainedOptunaSearch(space=space, metric=["test_accuracy", "loss/auc"], mode=["max", "min"],
                                     sampler=make_sampler("tpe", 0, 8, True), constraints=floor,
                                     max_concurrent=1, num_trials=3)
    results = [{"test_accuracy": 0.95, "loss/auc": 0.7}, {"test_accuracy": 0.85, "loss/auc": 0.5},
               {"test_accuracy": 0.92, "loss/auc": 0.6}]
    for i, r in enumerate(results):
        assert "x" in search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", r)
    trials = search._ot_study.get_trials()
    values = [t.system_attrs["constraints"] for t in trials]  # what the sampler's constraints_func returned
    assert [v == pytest.approx(e) for v, e in zip(values, [[-0.05, -0.1], [0.05, -0.3], [-0.02, -0.2]])] == [True] * 3
    assert sorted(t.number for t in search._ot_study.best_trials) == [0, 2]  # trial 1 breaks the floor
    front = feasible_front([{"trial": i, **r} for i, r in enumerate(results)],
                           [Objective(metric="test_accuracy", mode="max"), Objective(metric="loss/auc", mode="min")],
                           floor)
    assert front == {0, 2}


def test_the_first_console_line_names_the_space_or_with_many_defenses_their_sizes():
    from raymia.sweep import _space_line

    two = resolve_space(SweepSpec.model_validate({"sweep": {"defenses": [
        "hamp", {"name": "confidence", "space": {"top_k": {"choices": [1, 2]}, "decimals": None}}]}}))
    assert _space_line(two) == ("hamp: gamma [0.3, 0.99], alpha log [0.0001, 0.05], output_modification "
                                "{True, False}; confidence: top_k {1, 2}, temperature log [0.1, 10.0] if top_k: 2, decimals None if top_k not 1")
    many = resolve_space(load_spec(SWEEPS[0].parent / "digits-all.yaml", kind=SweepSpec))
    line = _space_line(many)
    assert line.startswith(f"{len(many)} defenses: hamp (3 parameters), dpsgd (4 parameters), ")
    assert "weight_decay (1 parameter)," in line and line.endswith("), tl_dmi (3 parameters); raymia check lists their spaces")
    assert len(line) < 400


class _Tune:
    """Tune's side of the Searcher API: up to `concurrent` trials run; when one ends, the free slots are
    offered again (a `suggest` that answers None leaves its slot free until the next end). The trials end
    oldest first, or newest first. `configs` holds the settings in the order they were proposed."""

    def __init__(self, search, n: int, concurrent: int, finish_newest_first: bool):
        self.search, self.n, self.concurrent, self.newest = search, n, concurrent, finish_newest_first
        self.configs: dict[str, dict] = {}
        self.running: list[str] = []
        self.ended: list[str] = []

    def run(self, save_at: int | None = None, path=None, stop_at: int | None = None):
        """Drive the search to its end; with `save_at`, the searcher saved to `path` after that many events
        (a proposal or a trial's end), as Tune saves its state, and `(configs, ended)` of that moment
        returned; with `stop_at`, the driver stops (is killed) after that many events."""
        events, saved = 0, None

        def event() -> bool:
            nonlocal events, saved
            events += 1
            if events == save_at:
                self.search.save(str(path))
                saved = (dict(self.configs), list(self.ended))
            return events == stop_at

        while len(self.configs) < self.n or self.running:
            while len(self.running) < self.concurrent and len(self.configs) < self.n:
                trial_id = f"t{len(self.configs)}"
                config = self.search.suggest(trial_id)
                if config is None:
                    break
                self.configs[trial_id] = config
                self.running.append(trial_id)
                if event():
                    return saved
            done = self.running.pop(-1 if self.newest else 0)
            x, y = self.configs[done]["x"], self.configs[done]["y"]
            self.search.on_trial_complete(done, {"a": x - y * y, "b": x * y})
            self.ended.append(done)
            if event():
                return saved
        return saved


def _xy_space(trial):  # at module level: Tune pickles the searcher with its space
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_float("y", 0.0, 1.0)


def _searcher(n: int, concurrent: int, sampler: str = "tpe", storage=None):
    from raymia.searcher import ConstrainedOptunaSearch, make_sampler

    return ConstrainedOptunaSearch(space=_xy_space, metric=["a", "b"], mode=["max", "min"], storage=storage,
                                   study_name="s" if storage is not None else None,
                                   sampler=make_sampler(sampler, 0, n, False), max_concurrent=concurrent, num_trials=n)


def _drive_search(finish_newest_first: bool, concurrent: int = 2, n: int = 8) -> list[dict]:
    """The settings proposed, in order, by a search driven to its end."""
    tune = _Tune(_searcher(n, concurrent), n, concurrent, finish_newest_first)
    tune.run()
    assert len(tune.search._ot_study.get_trials()) == n  # every trial told by the end
    return list(tune.configs.values())


def test_a_searcher_pickled_without_the_hold_rule_resumes_telling_trials_as_they_end():
    """A sweep begun by a raymia whose searcher had no hold rule, resumed by this one: Tune unpickles the old
    searcher into this class, and the trials proposed before the resume are told when they end."""
    import optuna
    from ray import cloudpickle

    from raymia.searcher import ConstrainedOptunaSearch, make_sampler

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    search = ConstrainedOptunaSearch(space=space, metric=["a"], mode=["max"], sampler=make_sampler("tpe", 0, 4, False),
                                     max_concurrent=2, num_trials=4)
    search.suggest("t0"), search.suggest("t1")
    for name in ("_in_step", "_num_trials", "_proposed", "_held", "_told"):
        delattr(search, name)  # the fields an older raymia's searcher did not have
    old = cloudpickle.loads(cloudpickle.dumps(search))  # as Tune pickles it into tuner.pkl
    old.on_trial_complete("t1", {"a": 1.0})  # the newer one ends first: told at once, nothing waits for it
    assert [t.state for t in old._ot_study.get_trials()] == [optuna.trial.TrialState.RUNNING,
                                                             optuna.trial.TrialState.COMPLETE]
    assert old.suggest("t2") is not None
    for t in ("t0", "t2"):
        old.on_trial_complete(t, {"a": 0.5})
    assert len(old._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3


def test_proposals_do_not_depend_on_which_concurrent_trial_ends_first():
    """Two trials at a time: whether the older or the newer one ends first (the machine's timing), the
    sampler sees the same finished trials at each proposal, so a sweep run again proposes the same settings."""
    oldest, newest = _drive_search(False), _drive_search(True)
    assert oldest == newest
    assert len({c["x"] for c in oldest}) == 8
    assert _drive_search(False, concurrent=1) != oldest  # one at a time the sampler sees more: other settings


def test_trials_held_by_the_searcher_run_in_the_processes_of_those_before(ray_local, tmp_path):
    """Two trials at a time, the second ending first: its result is held, and once the first ends two settings
    are proposed at once. Both run in the finished trials' processes; Tune alone keeps one of them and starts
    a new process for the other trial (`sweep._trial_processes_kept`)."""
    from ray import tune
    from ray.tune.execution import tune_controller
    from ray.tune.utils.object_cache import _ObjectCache

    from raymia.sweep import _fit

    first = _searcher(4, 2).suggest("t0")  # the search's first setting: the same seed proposes it again
    folder = tmp_path / "started"
    folder.mkdir()

    def trial(config):  # defined here, so Tune's trial processes get it by value
        import os
        import time

        later = 0  # how many trials other than the first started before this one
        while config != first:
            try:
                os.close(os.open(folder / str(later), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                later += 1
        # the second trial ends before the first; the two proposed then run long enough that a process
        # started for either of them would run it
        time.sleep(2.0 if config == first else 0.3 if later == 0 else 6.0)
        tune.report({"a": config["x"], "b": config["y"], "process": os.getpid()})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.01}),  # a sweep's trial_cpu: the CPUs are the pool's
        tune_config=tune.TuneConfig(search_alg=_searcher(4, 2), num_samples=4, max_concurrent_trials=2,
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="held", verbose=0),
    )
    grid = _fit(tuner, 2)
    assert len(grid) == 4 and not grid.errors
    assert len({r.metrics["process"] for r in grid}) == 2
    assert tune_controller._ObjectCache is _ObjectCache  # Tune as it was, once the sweep's fit is over


def _storage(url: str):
    from raymia.sweep_state import optuna_storage

    return optuna_storage(url)


def _trials(search) -> list[tuple]:
    return [(t.number, t.state, t.params, t.values) for t in search._ot_study.get_trials()]


# (save_at, stop_at, moved): Tune saved its state after `save_at` events, the sweep was killed after
# `stop_at`, and resumed with its study as the kill left it, or (moved) with none
KILLS = ((1, 3, False), (2, 5, True), (4, 6, False), (7, 8, False), (9, 12, True), (10, 13, False))


@pytest.mark.parametrize("sampler,concurrent,kind,kills", [
    ("tpe", 1, "journal", KILLS), ("tpe", 2, "journal", KILLS), ("tpe", 2, "sqlite", ((7, 9, False),)),
    ("nsga2", 2, "journal", ((9, 11, False), (11, 13, True))), ("gp", 2, "journal", ((6, 9, False),)),
])
def test_a_search_resumed_from_tunes_saved_state_proposes_what_it_would_have_undisturbed(
        tmp_path, sampler, concurrent, kind, kills):
    """A sweep killed some events after Tune's last save (a proposal or a trial's end is an event) leaves in
    its study the trials asked and told since; Tune resumes from the save, running again the trials that had
    not ended then, with their settings. The searcher it restores remakes the study as it was at the save, so
    the resumed search proposes the settings of the undisturbed one and its study ends the same, trial numbers
    included; also when the study is gone (another machine's sweep folder)."""
    n = 8
    url = (lambda name: f"sqlite:///{tmp_path / name}.db") if kind == "sqlite" else \
        (lambda name: f"journal:///{tmp_path / name}.log")
    ref = _Tune(_searcher(n, concurrent, sampler, _storage(url("ref"))), n, concurrent, False)
    ref.run()
    for save_at, stop_at, moved in kills:
        db = f"k{save_at}-{stop_at}"
        killed = _Tune(_searcher(n, concurrent, sampler, _storage(url(db))), n, concurrent, False)
        configs, ended = killed.run(save_at, tmp_path / "searcher.pkl", stop_at)
        search = _searcher(n, concurrent, sampler, _storage(url(f"new-{db}" if moved else db)))
        search.restore(str(tmp_path / "searcher.pkl"))
        resumed = _Tune(search, n, concurrent, True)  # the order trials end in is the machine's
        resumed.configs, resumed.ended = configs, ended
        resumed.running = [t for t in configs if t not in ended]  # run again with their settings
        resumed.run()
        assert resumed.configs == ref.configs, (save_at, stop_at)
        assert _trials(search) == _trials(ref.search), (save_at, stop_at)
