"""How often attacks cry "member" wrongly: the out-of-distribution evaluation of Hintersdorf et al. (2022).

The spec's `ood.sets` (`raymia.data.ood`) are queried by every bank model beside the audited points and
stored with the bank. For each attack and target t:

1. the attack's decision threshold is calibrated on a shadow: the target's paired model p (trained on the
   complement of t's half, never one of t's shadows) is attacked with its own shadows, and the threshold
   maximising TPR - FPR over p's in-distribution members and non-members is kept (`best_threshold`; a point
   is called a member when its score is above it), as the paper calibrates on its shadow model;
2. the non-member sets are appended to the signals as points attacks score but never fit on
   (`Signals.fit_mask`: every audited score stays as it was), and t is attacked;
3. per set (`held_out`: t's in-distribution non-members, then each OOD set), against t's members: the FPR
   and precision at that threshold (the recall is the same for every set), AUROC, AUPR (members positive),
   FPR at 95% TPR (the threshold that keeps 95% of t's members), and the mean max softmax score of the
   set's points the attack flags (false positives) and of those it does not (true negatives)
   (`max_score_flagged`, `max_score_unflagged`); for t's members the same split (true positives, false
   negatives) is `members/max_score_flagged|unflagged`.

Online attacks (`lira_online`, `rmia_online`) need shadows that trained on each scored point; no model
trained on an OOD input, so they are left out (listed in `skipped` with the reason). Metrics are the mean
over the targets (std beside), flat as `ood/<attack>/<set>/<metric>`, and `ood/<attack>/fpr`: the mean FPR
over the OOD sets (held-out data excluded), a sweep objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

OOD_PREFIX = "ood"
HELD_OUT = "held_out"
SET_METRICS = ("fpr", "precision", "auroc", "aupr", "fpr_tpr95", "max_score_flagged", "max_score_unflagged")
NEEDS_IN_SHADOWS = {"lira_online": "online LiRA needs shadows trained on each scored point",
                    "rmia_online": "online RMIA needs reference models trained on each scored point"}


@dataclass
class OodResult:
    """Per attack label: set -> metric -> mean over the targets (None: undefined), and the std; `recall`:
    the TPR at the calibrated threshold (the same for every set); `skipped`: attack -> why it is not here."""

    sets: list[str]
    label_sources: dict[str, str]
    attacks: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    attacks_std: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    recall: dict[str, float] = field(default_factory=dict)
    members: dict[str, dict[str, float | None]] = field(default_factory=dict)  # members' mean max score
    skipped: dict[str, str] = field(default_factory=dict)

    def ood_sets(self) -> list[str]:
        return [s for s in self.sets if s != HELD_OUT]

    def mean_fpr(self, attack: str) -> float | None:
        vals = [self.attacks[attack][s]["fpr"] for s in self.ood_sets()]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def flat_metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for a, per_set in self.attacks.items():
            for st, ms in per_set.items():
                out.update({f"{OOD_PREFIX}/{a}/{st}/{k}": v for k, v in ms.items()})
            out[f"{OOD_PREFIX}/{a}/fpr"] = self.mean_fpr(a)
            out[f"{OOD_PREFIX}/{a}/recall"] = self.recall[a]
            out.update({f"{OOD_PREFIX}/{a}/members/{k}": v for k, v in self.members[a].items()})
        return out

    def flat_std(self) -> dict[str, float | None]:
        return {f"{OOD_PREFIX}/{a}/{st}/{k}": v for a, per_set in self.attacks_std.items()
                for st, ms in per_set.items() for k, v in ms.items()}

    def to_json(self) -> dict[str, Any]:
        return {"sets": self.sets, "label_sources": self.label_sources, "attacks": self.attacks,
                "attacks_std_over_targets": self.attacks_std, "recall": self.recall, "members": self.members,
                "skipped": self.skipped}


def metric_names(spec) -> list[str]:
    """Every flat OOD metric an audit of `spec` reports (for sweep objectives and constraints)."""
    if spec.ood is None:
        return []
    sets = [HELD_OUT, *(s.key for s in spec.ood.sets)]
    names = []
    for a in spec.attacks:
        if a.name in NEEDS_IN_SHADOWS:
            continue
        names += [f"{OOD_PREFIX}/{a.key}/fpr", f"{OOD_PREFIX}/{a.key}/recall"]
        names += [f"{OOD_PREFIX}/{a.key}/members/max_score_{k}" for k in ("flagged", "unflagged")]
        names += [f"{OOD_PREFIX}/{a.key}/{s}/{k}" for s in sets for k in SET_METRICS]
    return names


def with_ood_points(signals, ood_logits: np.ndarray, ood_labels: np.ndarray):
    """The signals with the OOD inputs appended as points that no model trained on and no attack fits on."""
    m, p = signals.keep.shape
    n = ood_logits.shape[2]
    return replace(signals, logits=np.concatenate([signals.logits, ood_logits], axis=2),
                   labels=np.concatenate([signals.labels, ood_labels.astype(signals.labels.dtype)]),
                   keep=np.concatenate([signals.keep, np.zeros((m, n), dtype=bool)], axis=1),
                   fit_mask=np.concatenate([np.ones(p, dtype=bool), np.zeros(n, dtype=bool)]))


def set_metrics(members: np.ndarray, others: np.ndarray, threshold: float, max_score: np.ndarray
                ) -> dict[str, float | None]:
    """The metrics of one non-member set's scores `others` against the members' scores, at `threshold`
    (member when above); `max_score`: the target's max softmax score of each of `others`."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    flagged = others > threshold
    tp = int((members > threshold).sum())
    fp = int(flagged.sum())
    y = np.r_[np.ones(members.size), np.zeros(others.size)]
    s = np.r_[members, others]
    # The largest member score that keeps >= 95% of the members: the first ROC point with TPR >= 0.95, as
    # the paper's code reads it (integer arithmetic, so 5% of 20 members is exactly 1).
    t95 = np.sort(members)[members.size * 5 // 100]
    return {
        "fpr": fp / others.size,
        "precision": tp / (tp + fp) if tp + fp else None,
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "fpr_tpr95": float((others >= t95).mean()),
        "max_score_flagged": float(max_score[flagged].mean()) if flagged.any() else None,
        "max_score_unflagged": float(max_score[~flagged].mean()) if (~flagged).any() else None,
    }


def evaluate_ood(attacks: list, signals, ood_logits: np.ndarray, ood_labels: np.ndarray,
                 slices: dict[str, slice], label_sources: dict[str, str], targets: list[int]) -> OodResult:
    """The OOD evaluation of `attacks` (AttackSpec entries) against `targets` (see the module docstring)."""
    from raymia.attacks import run_attack
    from raymia.attacks.mia.threshold import best_threshold, max_confidence_stat
    from raymia.errors import RaymiaError

    ext = with_ood_points(signals, ood_logits, ood_labels)
    p = signals.num_points
    sets = [HELD_OUT, *slices]
    result = OodResult(sets=sets, label_sources={HELD_OUT: "true", **label_sources})
    for i, a in enumerate(attacks):
        if a.name in NEEDS_IN_SHADOWS:
            result.skipped[a.key] = NEEDS_IN_SHADOWS[a.name]
            continue
        runs: list[dict[str, dict[str, float | None]]] = []
        recalls, member_scores = [], []
        for t in targets:
            calib = signals.paired_model(t)
            if calib is None:
                calib = int(signals.shadows_of(t)[0])
            s_cal = run_attack(a.name, a.params, signals, calib, where=f"attacks.{i}")
            threshold = best_threshold(s_cal, signals.keep[calib])
            if threshold is None:  # a plan gives every model members and non-members; never the target's own
                raise RaymiaError(f"the calibration model {calib} of target {t} has no members or no non-members "
                                  "to set the threshold on", where=f"attacks.{i}")
            scores = run_attack(a.name, a.params, ext, t, where=f"attacks.{i}")
            member = signals.keep[t]
            members = scores[:p][member]
            recalls.append(float((members > threshold).mean()))
            max_score = max_confidence_stat(ext.logits[t, 0], None)  # the paper's max-softmax score
            hit, ms = members > threshold, max_score[:p][member]  # members found (TP) and missed (FN)
            member_scores.append((float(ms[hit].mean()) if hit.any() else None,
                                  float(ms[~hit].mean()) if (~hit).any() else None))
            per_set = {HELD_OUT: set_metrics(members, scores[:p][~member], threshold, max_score[:p][~member])}
            for key, sl in slices.items():
                idx = np.arange(sl.start, sl.stop) + p
                per_set[key] = set_metrics(members, scores[idx], threshold, max_score[idx])
            runs.append(per_set)
        signals.forget_derived()  # this attack's per-model transforms, shared by its targets
        ext.forget_derived()
        result.recall[a.key] = float(np.mean(recalls))
        result.members[a.key] = {f"max_score_{k}": (float(np.mean(v)) if (v := [x[i] for x in member_scores
                                                                                 if x[i] is not None]) else None)
                                  for i, k in enumerate(("flagged", "unflagged"))}
        result.attacks[a.key], result.attacks_std[a.key] = {}, {}
        for st in sets:
            mean, std = {}, {}
            for k in SET_METRICS:
                vals = [r[st][k] for r in runs if r[st][k] is not None]
                mean[k] = float(np.mean(vals)) if vals else None
                std[k] = float(np.std(vals)) if vals else None
            result.attacks[a.key][st], result.attacks_std[a.key][st] = mean, std
    return result
