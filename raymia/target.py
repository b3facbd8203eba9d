"""Your own trained model as the audit's target (`target:` in the spec; docs/own-model.md).

The bank's M models, trained on the same data with the spec's model and recipe, are all the target's
shadows; the target joins the signals as one more model, row M (`with_target`), with its membership row
from `target.members`. Its outputs come from its weights (`target.checkpoint`: loaded with
`weights_only=True` into the spec's model and queried in eval mode under the spec's queries, as the bank's
models are) or from a file (`target.outputs`: an API-only model's answers on training points and on the test
split). Since row M has no complementary pair in the bank (`Signals.paired_model`), every bank model is its
shadow and every audited point is IN for exactly half of them, as leave-one-out gives a bank target.

Every problem with the files is one `SpecError` naming the field: a checkpoint that does not fit the model,
members outside the training split, outputs of the wrong shape; a target whose accuracy on its own members
is near chance is one warning (its members or weights are probably not the ones it trained with).
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raymia.errors import SpecError, first_line, not_found

log = logging.getLogger("raymia")

OUTPUT_KEYS = ("logits", "probs")  # the target's outputs on training points, one of them
TEST_KEYS = ("test_logits", "test_probs")  # ... and on the test split


@dataclass(frozen=True)
class ExternalTarget:
    """The user's target, as the audit sees it.

    points:      int64   [P']        positions in the plan's population that the target answers
    member:      bool    [P']        whether it trained on each of them
    logits:      float32 [Q', P', C] its outputs there (log-probabilities when the file held probabilities)
    test_logits: float32 [Q', T, C]  its outputs on the test split
    queries:     int64   [Q']        positions of its queries in spec.queries (all of them for a checkpoint)
    """

    points: np.ndarray
    member: np.ndarray
    logits: np.ndarray
    test_logits: np.ndarray
    queries: np.ndarray
    source: str  # "checkpoint" or "outputs"

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "points": int(self.points.size), "members": int(self.member.sum()),
                "queries": int(self.queries.size)}


def target_digest(spec) -> str:
    """8 hex digits of SHA-256 over the target's files (checkpoint or outputs) and its members (the list or
    the file's bytes): two targets audited against the same bank get their own report folders and runs. A
    file that is missing hashes as its name (the audit then refuses it in one line)."""
    import hashlib

    h = hashlib.sha256()
    t = spec.target
    for item in (t.checkpoint or t.outputs, t.members):
        if isinstance(item, list):
            h.update(json.dumps(item).encode())
        elif Path(item).is_file():
            with open(item, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(item).encode())
    return h.hexdigest()[:8]


def check_target_spec(spec) -> None:
    """What a target excludes, before any file is read: one SpecError naming the field."""
    from raymia.spec import SweepSpec

    if isinstance(spec, SweepSpec):
        raise SpecError("a sweep searches defenses for the models raymia trains; audit your model with "
                        "`raymia audit` (or raymia.run_audit)", where="target")
    if spec.plan.targets not in ("all", [0]):  # the default, which a saved spec.yaml spells out (earlier: [0])
        raise SpecError("with target: your model is the one attacked and every bank model is its shadow; "
                        "remove plan.targets", where="plan.targets")
    if spec.ood is not None:
        raise SpecError("the out-of-distribution evaluation runs on the bank's own targets; it is not available "
                        "with target:", where="ood")
    if spec.inversion is not None:
        if spec.target.checkpoint is None:
            raise SpecError("model inversion needs your model's weights (target.checkpoint): an outputs file "
                            "answers only the points it holds, not the images an attack generates",
                            where="inversion")
        if spec.inversion.targets != 1:
            raise SpecError("with target: your model is the one target to invert; remove inversion.targets",
                            where="inversion.targets")
    if spec.attacker != "adaptive":
        raise SpecError("with target: the shadows follow the spec's defense; for undefended shadows set "
                        "defense: none", where="attacker")
    if spec.data.private_classes is not None:
        raise SpecError("target.members index the whole training split; remove the class split", where="data")


def read_members(value: list[int] | str, n_train: int, where: str = "target.members") -> np.ndarray:
    """The target's member indices (sorted, unique) from a list or a file: .npy (integers, or a bool mask
    of the training split), .json (a list), .txt / .csv (integers separated by commas, spaces or lines)."""
    if isinstance(value, list):
        idx = np.asarray(value)
    else:
        path = Path(value)
        where = f"{where} ({path})"
        if not path.is_file():
            raise SpecError(not_found(path), where=where)
        suffix = path.suffix.lower()
        try:
            if suffix == ".npy":
                from raymia.data.readers import numpy_file

                if not numpy_file(path):  # numpy takes any other bytes for a pickle
                    raise ValueError("not a .npy array (numpy.save writes one)")
                idx = np.load(path, allow_pickle=False)
            elif suffix == ".json":
                idx = np.asarray(json.loads(path.read_text()))
            elif suffix in (".txt", ".csv"):
                tokens = path.read_text().replace(",", " ").split()
                idx = np.asarray([int(t) for t in tokens])
            else:
                raise SpecError(f"unknown file type {suffix or '(none)'!r}; accepted: .npy, .json, .txt, .csv",
                                where=where)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"not a list of integer indices: {first_line(e)}", where=where) from None
    if idx.dtype == np.bool_:
        if idx.shape != (n_train,):
            raise SpecError(f"a boolean mask must cover the {n_train} training points, got shape {idx.shape}",
                            where=where)
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise SpecError(f"expected a non-empty 1-D list of integer indices, got {idx.dtype} of shape {idx.shape}",
                        where=where)
    bad = idx[(idx < 0) | (idx >= n_train)]
    if bad.size:
        raise SpecError(f"index {int(bad[0])} is outside the training split (0..{n_train - 1}); {bad.size} such "
                        "indices", where=where)
    return np.unique(idx.astype(np.int64))


def load_checkpoint(path: str, model, model_name: str, where: str = "target.checkpoint"):
    """`model` with the weights of the state_dict in `path` (torch.load(weights_only=True): no pickled code
    runs). A dict holding the state_dict under state_dict / model_state_dict / model is accepted, and a
    'module.' prefix (DataParallel) is dropped; a file that does not fit the model is one SpecError."""
    import torch

    where = f"{where} ({path})"
    if not Path(path).is_file():
        raise SpecError(not_found(path), where=where)
    try:
        with warnings.catch_warnings():
            # torch's note on a pickle protocol other than its own 2 (a file pickle.dump wrote, or torch.save
            # with pickle_protocol=4): the file either loads, or fails with the one line below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bytes of any other kind fail in pickle's own ways too (KeyError, struct.error, ...)
        raise SpecError("not a weights file that torch.load(weights_only=True) reads (save the model's "
                        f"state_dict() with torch.save): {_load_reason(e)}", where=where) from None
    if isinstance(state, dict) and not _all_tensors(state):
        inner = [k for k in ("state_dict", "model_state_dict", "model") if isinstance(state.get(k), dict)]
        if inner:
            state = state[inner[0]]
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        raise SpecError("holds no state_dict (a mapping of names to tensors); save model.state_dict()",
                        where=where)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {list(state[k].shape)} in the file and {list(expected[k].shape)} in the model")
        raise SpecError(f"does not fit model {model_name!r}: {'; '.join(parts)}", where=where)
    model.load_state_dict(state)
    return model


def _all_tensors(d: dict) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in d.values())


def load_target(spec, ctx) -> ExternalTarget:
    """The spec's target against the bank context `ctx` (its data and plan): members read and checked,
    outputs computed from the checkpoint or read from the outputs file; warns when the target's accuracy on
    its own members is near chance."""
    n_train = ctx.data.x_train.shape[0]
    members = read_members(spec.target.members, n_train)
    if spec.target.checkpoint is not None:
        target = _from_checkpoint(spec, ctx, members)
    else:
        target = _from_outputs(spec, ctx, members)
    inside = int(target.member.sum())
    if inside == 0 or inside == target.member.size:
        what = "none of" if inside == 0 else "all of"
        raise SpecError(f"{what} the {target.member.size} audited points the target answers are its members: an "
                        "audit needs members and non-members (check target.members, or plan.population)",
                        where="target.members")
    _warn_implausible(target, ctx.audited_y, ctx.data.info.num_classes)
    return target


def _warn_implausible(target: ExternalTarget, labels: np.ndarray, num_classes: int) -> None:
    """One warning when the target's outputs do not look like those of a model trained on its members:
    accuracy on them near chance (wrong weights), or a loss on them no lower than on the audited points
    it did not train on (members that are not the ones it trained on, drawn at random for instance)."""
    from raymia.attacks.mia import cross_entropy
    from raymia.metrics import accuracy

    mem = target.member
    y = labels[target.points]
    acc = accuracy(target.logits[0, mem], y[mem])
    chance = 1.0 / num_classes
    if acc < chance + 0.1 * (1 - chance):
        log.warning("target: its accuracy on its %d members is %.1f%%, near chance (%.1f%%): check that "
                    "target.members are the indices it trained on and that its weights or outputs are the "
                    "trained model's", int(mem.sum()), 100 * acc, 100 * chance)
        return
    loss = cross_entropy(np.asarray(target.logits[0], dtype=np.float64), y)
    inside, outside = float(loss[mem].mean()), float(loss[~mem].mean())
    if inside >= outside:
        log.warning("target: its mean loss on its %d members (%.3g) is no lower than on the %d audited points "
                    "it did not train on (%.3g), as for members drawn at random: check that target.members "
                    "are the indices it trained on (a model that leaks nothing at all also shows this)",
                    int(mem.sum()), inside, int((~mem).sum()), outside)


def checkpoint_model(spec, ctx, device):
    """The target's model (`model:` built for the data, the checkpoint's weights loaded), on `device`, in
    eval mode: what the audit queries, and what the inversion attacks invert."""
    from raymia.models import build_model

    model = build_model(spec.model.name, spec.model.params, ctx.data.info)
    load_checkpoint(spec.target.checkpoint, model, spec.model.name)
    return model.to(device).eval()


def _from_checkpoint(spec, ctx, members: np.ndarray) -> ExternalTarget:
    import torch

    from raymia.seeding import derive_seed
    from raymia.train.infer import query_logits

    if ctx.defense.modifies_outputs:
        raise SpecError(f"defense {spec.defense.name!r} changes the released outputs, which a checkpoint's "
                        "weights do not: audit the outputs your system releases with target.outputs",
                        where="target.checkpoint")
    device = torch.device("cuda" if spec.bank.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = checkpoint_model(spec, ctx, device)
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, "query", "target"))
    logits = query_logits(model, ctx.defense, ctx.audited_x, spec.queries, gen, device=device).numpy()
    test = query_logits(model, ctx.defense, ctx.data.x_test, spec.queries, gen, device=device).numpy()
    population = ctx.plan.population
    return ExternalTarget(points=np.arange(population.size), member=np.isin(population, members),
                          logits=logits.astype(np.float32), test_logits=test.astype(np.float32),
                          queries=np.arange(len(spec.queries)), source="checkpoint")


def _load_reason(e: BaseException) -> str:
    """Why torch.load refused a file, in one line: the unpickler's own reason (e.g. "Unsupported global:
    GLOBAL net.Net ..."), not the paragraph before it that suggests weights_only=False; ANSI colours dropped."""
    import re

    if not isinstance(e, pickle.UnpicklingError | RuntimeError | EOFError | zipfile.BadZipFile | ValueError):
        return f"{type(e).__name__}: {e}"[:300]  # pickle stumbling over bytes it cannot read: KeyError: 101
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    head, found, rest = text.partition("WeightsUnpickler error:")
    if found:
        lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
        if lines:
            return lines[0][:300]
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


def _from_outputs(spec, ctx, members: np.ndarray) -> ExternalTarget:
    path = Path(spec.target.outputs)
    where = f"target.outputs ({path})"
    if not path.is_file():
        raise SpecError(not_found(path), where=where)
    from raymia.data.readers import numpy_file

    if not numpy_file(path):  # numpy takes any other bytes for a pickle, and suggests allow_pickle=True
        raise SpecError("not an .npz archive: numpy.savez writes a zip file of .npy arrays, and this file is "
                        "neither a zip file nor a .npy array", where=where)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise SpecError(f"not an .npz archive numpy reads without pickles: {first_line(e)}",
                        where=where) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SpecError("expected an .npz archive (numpy.savez) with indices and logits or probs", where=where)
    with z:
        try:
            arrays = {k: z[k] for k in z.files}
        except ValueError as e:  # an object array, which would need pickles
            raise SpecError(f"holds an array numpy reads only with pickles: {e}", where=where) from None
    c = ctx.data.info.num_classes
    n_train, n_test = ctx.data.x_train.shape[0], ctx.data.x_test.shape[0]

    queries = _queries(arrays, spec.queries, where)
    outputs = _scores(arrays, OUTPUT_KEYS, len(queries), c, where)
    test = _scores(arrays, TEST_KEYS, len(queries), c, where)
    if "indices" not in arrays:
        raise SpecError("lacks 'indices': the training-split index of each row of the outputs", where=where)
    idx = arrays["indices"]
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size != outputs.shape[1]:
        raise SpecError(f"indices must be 1-D integers, one per output row ({outputs.shape[1]}), got {idx.dtype} "
                        f"of shape {idx.shape}", where=where)
    if idx.size and (idx.min() < 0 or idx.max() >= n_train):
        raise SpecError(f"indices must lie in the training split (0..{n_train - 1})", where=where)
    if np.unique(idx).size != idx.size:
        raise SpecError("indices repeat a point", where=where)
    if test.shape[1] != n_test:
        raise SpecError(f"test outputs cover {test.shape[1]} points; the test split has {n_test}", where=where)

    population = ctx.plan.population  # sorted
    pos = np.searchsorted(population, idx)
    found = (pos < population.size) & (population[np.minimum(pos, population.size - 1)] == idx)
    if not found.all():
        log.info("target.outputs: %d of its %d points lie outside the audited population (plan.population) and "
                 "are not scored", int((~found).sum()), idx.size)
    order = np.argsort(pos[found], kind="stable")
    points = pos[found][order]
    logits = outputs[:, found][:, order]
    return ExternalTarget(points=points.astype(np.int64), member=np.isin(population[points], members),
                          logits=logits, test_logits=test, queries=queries, source="outputs")


def _queries(arrays: dict[str, np.ndarray], spec_queries: list[str], where: str) -> np.ndarray:
    """Positions in spec.queries of the queries the file answers (`queries`; absent: identity only)."""
    names = [str(q) for q in arrays["queries"].tolist()] if "queries" in arrays else ["identity"]
    if not names or names[0] != "identity":
        raise SpecError(f"queries must start with 'identity', got {names}", where=where)
    missing = [q for q in names if q not in spec_queries]
    if missing:
        raise SpecError(f"answers query {missing[0]!r}, which the spec's queries {spec_queries} lack: the shadows "
                        "must be queried the same way", where=where)
    return np.asarray([spec_queries.index(q) for q in names], dtype=np.int64)


def _scores(arrays: dict[str, np.ndarray], keys: tuple[str, str], num_queries: int, c: int, where: str) -> np.ndarray:
    """[Q, N, C] float32 logits from the one of `keys` (logits, or probabilities as their logarithm) present."""
    present = [k for k in keys if k in arrays]
    if len(present) != 1:
        raise SpecError(f"needs exactly one of {' or '.join(keys)}, found {present or 'neither'} (arrays: "
                        f"{', '.join(sorted(arrays))})", where=where)
    key = present[0]
    a = np.asarray(arrays[key])
    if not np.issubdtype(a.dtype, np.floating):
        raise SpecError(f"{key} must be floating point, got {a.dtype}", where=where)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] != num_queries or a.shape[2] != c:
        raise SpecError(f"{key} must be [N, {c}] (or [Q={num_queries}, N, {c}] with queries), got {list(arrays[key].shape)}",
                        where=where)
    if not np.isfinite(a).all():
        raise SpecError(f"{key} holds NaN or infinite values", where=where)
    if key.endswith("probs"):
        if a.min() < 0 or np.abs(a.sum(-1) - 1).max() > 1e-3:
            raise SpecError(f"{key} must be probabilities: non-negative, each row summing to 1", where=where)
        a = np.log(np.clip(a, 1e-12, None))  # softmax of these is the probabilities again
    return a.astype(np.float32)


def with_target(signals, target: ExternalTarget):
    """The bank's signals restricted to the target's points and queries, with the target appended as model
    M (the last row): attack it as target M and every bank model is its shadow."""
    from raymia.signals import Signals

    q, pts = target.queries, target.points
    return Signals(
        logits=np.concatenate([signals.logits[:, q][:, :, pts], target.logits[None]]),
        labels=signals.labels[pts],
        keep=np.concatenate([signals.keep[:, pts], target.member[None]]),
        pop_logits=np.concatenate([signals.pop_logits[:, q], target.test_logits[None]]),
        pop_labels=signals.pop_labels,
    )

