"""Learned attacks: a small classifier trained on shadow outputs labelled IN/OUT, applied to the target.

- shokri (Shokri et al. 2017): input = the full softmax vector. `class_input` trains one classifier whose
  input is the softmax vector followed by a one-hot of the true label; `per_class` trains one classifier per
  true class on the softmax vectors of that class (the paper's per-class attack models).
- salem (Salem et al. 2019, ML-Leaks; the attack of Hintersdorf et al.'s "To Trust or Not To Trust"):
  input = the three largest softmax scores sorted in descending order (zero-padded with fewer than 3
  classes), one MLP 3 -> hidden -> 1.

Training rows are (shadow, point) pairs, `max_train` of them drawn uniformly without replacement from all
shadows x audited points (all pairs when there are fewer), labelled by the shadow's known membership. The
score of a point is the classifier's predicted P(member) for the target's output on it. Features are
computed in float64 from the logits; the classifiers (scikit-learn MLPClassifier with early stopping off,
or LogisticRegression) run in scikit-learn's own precision, and their probabilities are returned as float64.
Everything random derives from `seed`, so a run is reproducible. The target's own membership row is never
read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from raymia.attacks.mia import log_softmax
from raymia.attacks.mia.threshold import check_query
from raymia.attacks.registry import ATTACKS
from raymia.registry import MAX_EPOCHS, Params
from raymia.signals import Signals

if TYPE_CHECKING:
    from sklearn.neural_network import MLPClassifier

# scikit-learn is imported where a classifier is fitted: the registry loads every attack module, and its
# import (about a second) would otherwise be paid by every process that runs any attack.

# per_class mode: a class with fewer training rows than this gets a logistic regression instead of an MLP.
MIN_MLP_ROWS = 100


class _LearnedParams(Params):
    hidden: int = Field(64, ge=1, le=4096, description="Width of the attack MLP's single hidden layer.")
    max_train: int = Field(
        20000,
        ge=10,
        description="Number of (shadow, point) training rows, drawn uniformly without replacement "
        "(all pairs when there are fewer).",
    )
    max_iter: int = Field(
        200, ge=1, le=MAX_EPOCHS, description="Maximum number of training epochs of the attack MLP."
    )
    seed: int = Field(0, ge=0, description="Seed of the row sampling and of the attack classifier.")
    query: int = Field(
        0,
        ge=0,
        description="Index of the query augmentation whose outputs are used (0 = the original input).",
    )


class ShokriParams(_LearnedParams):
    mode: Literal["per_class", "class_input"] = Field(
        "class_input",
        description="'class_input': one classifier on [softmax vector, one-hot true label]; "
        "'per_class': one classifier per true class on the softmax vector.",
    )


class SalemParams(_LearnedParams):
    pass


def softmax64(logits: np.ndarray) -> np.ndarray:
    """softmax over the last axis, float64."""
    return np.exp(log_softmax(logits))


def sample_shadow_rows(
    signals: Signals, target: int, max_train: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(models [N], points [N], is_in bool [N]): training pairs drawn uniformly from shadows x points."""
    shadows = signals.shadows_of(target)
    fit = signals.fit_index  # rows come from the points attacks may fit on
    p = fit.size
    n_pairs = shadows.size * p
    if n_pairs == 0:
        raise ValueError("learned attacks need at least one shadow model and one audited point")
    rng = np.random.default_rng(seed)
    flat = (
        np.arange(n_pairs) if n_pairs <= max_train else np.sort(rng.choice(n_pairs, max_train, replace=False))
    )
    models = shadows[flat // p]
    points = fit[flat % p]
    is_in = np.asarray(signals.keep[models, points], dtype=np.bool_)
    if is_in.all() or not is_in.any():
        raise ValueError("learned attacks need both IN and OUT shadow observations to train on")
    return models, points, is_in


def _mlp(hidden: int, max_iter: int, seed: int) -> MLPClassifier:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(
        hidden_layer_sizes=(hidden,), early_stopping=False, max_iter=max_iter, random_state=seed
    )


def _fit(clf, x_train: np.ndarray, y_train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fit clf on (x_train, y_train in {0, 1}); returns x -> P(y = 1) as float64."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # max_iter is a training budget: stopping at it is expected, not a failure worth a warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    col = int(np.flatnonzero(clf.classes_ == 1)[0])
    return lambda x: np.asarray(clf.predict_proba(x)[:, col], dtype=np.float64)


def _trained(signals: Signals, target: int, params: Params, fit: Callable[[], Callable]) -> Callable:
    """The attack's classifier(s), fitted on the target's shadows once for the target and its paired model
    (the same shadows, the same rows drawn from the same seed: the same fit)."""
    key = ("learned", type(params).__name__, params.model_dump_json(), signals.shadow_mask(target).tobytes())
    return signals.derived(key, fit)


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((labels.shape[0], num_classes), dtype=np.float64)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


@ATTACKS.register(
    "shokri",
    ShokriParams,
    doc="Shokri et al. shadow-model attack: MLP on softmax outputs (+ true label) trained IN/OUT on shadows.",
)
def shokri_attack(signals: Signals, target: int, params: ShokriParams) -> np.ndarray:
    """P(member) of an attack classifier trained on the shadows' softmax vectors (see module doc)."""
    check_query(signals, params.query)
    q, c, labels = params.query, signals.num_classes, signals.labels
    x_target = softmax64(signals.logits[target, q])
    if params.mode == "class_input":
        x_target = np.concatenate([x_target, _one_hot(labels, c)], axis=1)
    predict = _trained(signals, target, params, lambda: _fit_shokri(signals, target, params))
    return predict(x_target)


def _fit_shokri(signals: Signals, target: int, params: ShokriParams) -> Callable[[np.ndarray], np.ndarray]:
    """Shokri's classifier(s) on the target's shadows: x_target [P, C (+ C)] -> scores [P]."""
    models, points, is_in = sample_shadow_rows(signals, target, params.max_train, params.seed)
    q, c, labels = params.query, signals.num_classes, signals.labels
    x_train = softmax64(signals.logits[models, q, points])
    y_train = is_in.astype(np.int64)
    if params.mode == "class_input":
        x_train = np.concatenate([x_train, _one_hot(labels[points], c)], axis=1)
        return _fit(_mlp(params.hidden, params.max_iter, params.seed), x_train, y_train)
    per_class: dict[int, float | Callable[[np.ndarray], np.ndarray]] = {}
    prior = float(y_train.mean())
    row_cls = labels[points]
    for cls in np.unique(labels):
        rows = row_cls == cls
        y = y_train[rows]
        n_in = int(y.sum())
        if n_in == 0 or n_in == y.size:  # no training rows, or one side only: the IN rate is all we know
            per_class[int(cls)] = float(y.mean()) if y.size else prior
            continue
        if y.size >= MIN_MLP_ROWS:
            clf = _mlp(params.hidden, params.max_iter, params.seed)
        else:
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(max_iter=1000)
        per_class[int(cls)] = _fit(clf, x_train[rows], y)

    def predict(x_target: np.ndarray) -> np.ndarray:
        scores = np.empty(signals.num_points, dtype=np.float64)
        for cls, rule in per_class.items():
            cols = labels == cls
            scores[cols] = rule if isinstance(rule, float) else rule(x_target[cols])
        return scores

    return predict


def top3(probs: np.ndarray) -> np.ndarray:
    """The three largest probabilities of each row, descending, zero-padded to 3 columns; float64 [N, 3]."""
    s = -np.sort(-np.asarray(probs, dtype=np.float64), axis=-1)[..., :3]
    if s.shape[-1] < 3:
        s = np.concatenate([s, np.zeros(s.shape[:-1] + (3 - s.shape[-1],))], axis=-1)
    return s


@ATTACKS.register(
    "salem",
    SalemParams,
    doc="Salem et al. ML-Leaks attack: MLP 3 -> 64 -> 1 on the top-3 softmax scores, trained on shadows.",
)
def salem_attack(signals: Signals, target: int, params: SalemParams) -> np.ndarray:
    """P(member) of an MLP on the sorted top-3 softmax scores, trained on the shadows (see module doc)."""
    check_query(signals, params.query)

    def fit() -> Callable[[np.ndarray], np.ndarray]:
        models, points, is_in = sample_shadow_rows(signals, target, params.max_train, params.seed)
        x_train = top3(softmax64(signals.logits[models, params.query, points]))
        return _fit(_mlp(params.hidden, params.max_iter, params.seed), x_train, is_in.astype(np.int64))

    return _trained(signals, target, params, fit)(top3(softmax64(signals.logits[target, params.query])))
