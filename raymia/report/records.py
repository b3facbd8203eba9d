"""Per-record results: every audited point's score per attack and target, and the records that leak most.

`records.parquet` (one row per target and audited point: target, index (into the training split), label,
member, then one float64 column of scores per attack, higher meaning "more likely a member") is what a
user loads to look at single records (pandas, polars, DuckDB, `read_records`). A point is flagged by an
attack on a target when its score exceeds the threshold that `FLAG_FPR` of the target's non-members
exceed (`flag_thresholds`); `vulnerable` ranks the members by how many attacks flag them, then by how far
above the non-members their score lies (percentile, then standard deviations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLAG_FPR = 0.01  # a point is flagged at the threshold that flags this share of the non-members
RECORDS_FILE = "records.parquet"
VULNERABLE_FILE = "vulnerable.csv"
FIXED_COLUMNS = ("target", "index", "label", "member")


@dataclass
class PointScores:
    """What every attack scored on every audited point, per target.

    index:   int64   [P]           training-split index of each audited point
    label:   int64   [P]
    member:  bool    [T, P]        membership of each point in each target's training set
    scores:  attack -> float64 [T, P]
    targets: the attacked models (rows of the signals), in the order of the T rows
    """

    index: np.ndarray
    label: np.ndarray
    member: np.ndarray
    scores: dict[str, np.ndarray]
    targets: list[int]

    def __post_init__(self) -> None:
        t, p = len(self.targets), self.index.shape[0]
        if self.label.shape != (p,) or self.member.shape != (t, p):
            raise ValueError(f"label must be [P={p}] and member [T={t}, P={p}], got {self.label.shape}, {self.member.shape}")
        for a, s in self.scores.items():
            if s.shape != (t, p):
                raise ValueError(f"scores of {a} must be [T={t}, P={p}], got {s.shape}")
        clash = set(self.scores) & set(FIXED_COLUMNS)
        if clash:
            raise ValueError(f"attack labels {sorted(clash)} clash with the records' columns")


def write_records(points: PointScores, path: Path) -> Path:
    """The scores as a Parquet table, one row per (target, point)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t, p = len(points.targets), points.index.shape[0]
    cols = {
        "target": np.repeat(np.asarray(points.targets, dtype=np.int64), p),
        "index": np.tile(points.index.astype(np.int64), t),
        "label": np.tile(points.label.astype(np.int64), t),
        "member": points.member.reshape(-1),
        **{a: s.reshape(-1).astype(np.float64) for a, s in points.scores.items()},
    }
    pq.write_table(pa.table(cols), path)
    return path


def read_records(path: str | Path) -> PointScores:
    """A `records.parquet` back as PointScores (rows grouped by target, in file order); a file that is not
    one (cut short, or another program's) is a DataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymia.errors import DataError

    try:
        table = pq.read_table(path).to_pydict()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"is not a records file raymia wrote ({str(e).splitlines()[0]})", where=str(path)) from None
    if not set(FIXED_COLUMNS) <= set(table):
        raise DataError(f"lacks the columns {sorted(set(FIXED_COLUMNS) - set(table))}", where=str(path))
    target = np.asarray(table["target"], dtype=np.int64)
    targets = list(dict.fromkeys(target.tolist()))
    p = int((target == targets[0]).sum())
    first = slice(0, p)
    return PointScores(
        index=np.asarray(table["index"], dtype=np.int64)[first],
        label=np.asarray(table["label"], dtype=np.int64)[first],
        member=np.asarray(table["member"], dtype=bool).reshape(len(targets), p),
        scores={a: np.asarray(v, dtype=np.float64).reshape(len(targets), p)
                for a, v in table.items() if a not in FIXED_COLUMNS},
        targets=targets,
    )


def flag_thresholds(scores: np.ndarray, member: np.ndarray, fpr: float = FLAG_FPR) -> np.ndarray:
    """Per target, the score above which a point is flagged: at most `fpr` of the target's non-members lie
    strictly above it (the non-members' (1 - fpr) quantile, taken as an order statistic)."""
    out = np.empty(scores.shape[0])
    for t in range(scores.shape[0]):
        non = np.sort(scores[t, ~member[t]])
        allowed = int(np.floor(fpr * non.size))  # non-members that may lie above the threshold
        out[t] = non[non.size - 1 - allowed] if non.size else np.inf
    return out


def flags(points: PointScores, fpr: float = FLAG_FPR) -> dict[str, np.ndarray]:
    """attack -> bool [T, P]: the point's score exceeds the attack's flag threshold on that target."""
    return {a: s > flag_thresholds(s, points.member, fpr)[:, None] for a, s in points.scores.items()}


def nonmember_percentile(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """[T, P]: the share of the target's non-members whose score lies below each point's (1: above all)."""
    out = np.empty_like(scores)
    for t in range(scores.shape[0]):
        non = np.sort(scores[t, ~member[t]])
        out[t] = np.searchsorted(non, scores[t], side="left") / max(non.size, 1)
    return out


def nonmember_z(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """[T, P]: how many standard deviations of the target's non-member scores each point lies above their mean."""
    out = np.empty_like(scores)
    for t in range(scores.shape[0]):
        non = scores[t, ~member[t]]
        out[t] = (scores[t] - non.mean()) / max(float(non.std()), 1e-12)
    return out


def vulnerable(points: PointScores, top: int = 20, fpr: float = FLAG_FPR) -> list[dict]:
    """The members that leak most: for each (target, member point), how many attacks flag it, its highest
    non-member percentile over the attacks, and that attack's distance above the non-members in their
    standard deviations (`z`: it orders the members that score above every non-member); ranked by the
    count, then the percentile, then z. Rows: target, index, label, flagged_by (count), attacks (their
    labels), percentile, z, and the strongest attack with its score."""
    flagged = flags(points, fpr)
    names = list(points.scores)
    if not names:
        return []
    count = sum(flagged[a].astype(np.int64) for a in names)  # [T, P]
    # each point's strongest attack: the first of highest (percentile, z), as max() over the names picks it
    best = np.zeros(points.member.shape, dtype=np.intp)
    best_pct = nonmember_percentile(points.scores[names[0]], points.member)
    best_z = nonmember_z(points.scores[names[0]], points.member)
    for k, a in enumerate(names[1:], start=1):
        pct, z = nonmember_percentile(points.scores[a], points.member), nonmember_z(points.scores[a], points.member)
        wins = (pct > best_pct) | ((pct == best_pct) & (z > best_z))
        best[wins], best_pct[wins], best_z[wins] = k, pct[wins], z[wins]
    # only the members, ranked by count, percentile, z (descending), then target and index
    ti, i = np.nonzero(points.member)
    target = np.asarray(points.targets, dtype=np.int64)[ti]
    index = points.index[i].astype(np.int64)
    order = np.lexsort((index, target, -best_z[ti, i], -best_pct[ti, i], -count[ti, i]))[:top]
    rows = []
    for r in order:
        t, p = ti[r], i[r]
        attack = names[best[t, p]]
        rows.append({"target": int(target[r]), "index": int(index[r]), "label": int(points.label[p]),
                     "flagged_by": int(count[t, p]), "attacks": [a for a in names if flagged[a][t, p]],
                     "percentile": float(best_pct[t, p]), "z": float(best_z[t, p]), "attack": attack,
                     "score": float(points.scores[attack][t, p])})
    return rows


def write_vulnerable(rows: list[dict], path: Path) -> Path:
    """The vulnerable records as CSV (attacks joined by '+')."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "index", "label", "flagged_by", "attacks", "percentile", "z", "attack", "score"])
        for r in rows:
            w.writerow([r["target"], r["index"], r["label"], r["flagged_by"], "+".join(r["attacks"]),
                        f"{r['percentile']:.4f}", f"{r['z']:.3g}", r["attack"], f"{r['score']:.6g}"])
    return path
