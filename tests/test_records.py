"""The records that leak most (`report.records.vulnerable`) against the plain per-member ranking."""

from __future__ import annotations

import numpy as np
import pytest

from raymia.report.records import PointScores, flags, nonmember_percentile, nonmember_z, vulnerable


def _plain_vulnerable(points: PointScores, top: int = 20) -> list[dict]:
    """One dict per (target, member), each's strongest attack by max() over the names, sorted in Python."""
    flagged = flags(points)
    pct = {a: nonmember_percentile(s, points.member) for a, s in points.scores.items()}
    z = {a: nonmember_z(s, points.member) for a, s in points.scores.items()}
    names, rows = list(points.scores), []
    for ti, t in enumerate(points.targets):
        for i in np.flatnonzero(points.member[ti]):
            by = [a for a in names if flagged[a][ti, i]]
            best = max(names, key=lambda a: (pct[a][ti, i], z[a][ti, i]))
            rows.append({"target": t, "index": int(points.index[i]), "label": int(points.label[i]),
                         "flagged_by": len(by), "attacks": by, "percentile": float(pct[best][ti, i]),
                         "z": float(z[best][ti, i]), "attack": best, "score": float(points.scores[best][ti, i])})
    rows.sort(key=lambda r: (-r["flagged_by"], -r["percentile"], -r["z"], r["target"], r["index"]))
    return rows[:top]


def _points(t: int, p: int, attacks: int, levels: int | None, seed: int = 0) -> PointScores:
    """Scores that tie often with `levels` distinct values (counts, correctness), continuous without."""
    rng = np.random.default_rng(seed)
    member = rng.random((t, p)) < 0.5
    scores = {}
    for k in range(attacks):
        s = rng.standard_normal((t, p)) + (0.5 + 0.3 * k) * member
        scores[f"a{k}"] = np.round(s * levels / 4) if levels else s
    return PointScores(index=rng.permutation(5 * p)[:p], label=rng.integers(0, 10, p), member=member,
                       scores=scores, targets=[7 + 2 * j for j in range(t)])


@pytest.mark.parametrize("levels", [None, 3, 12])
@pytest.mark.parametrize("top", [1, 20, 10_000])
def test_vulnerable_ranks_as_the_plain_per_member_loop(levels, top):
    points = _points(4, 300, 5, levels)
    assert vulnerable(points, top=top) == _plain_vulnerable(points, top=top)


def test_vulnerable_without_attacks_or_members():
    points = _points(2, 50, 2, None)
    assert vulnerable(PointScores(points.index, points.label, points.member, {}, points.targets)) == []
    none = np.zeros_like(points.member)
    assert vulnerable(PointScores(points.index, points.label, none, points.scores, points.targets)) == []


def test_vulnerable_keeps_arrays_not_a_row_per_member():
    """A row per (target, member) was a Python dict each: 256 targets x 30,000 members held gigabytes and took
    minutes before the top 20 were cut. The ranking is over [T, P] arrays now."""
    import tracemalloc

    points = _points(16, 5_000, 6, None)
    one = points.scores["a0"].nbytes  # one attack's scores, float64 [T, P]
    tracemalloc.start()
    try:
        rows = vulnerable(points)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 20 and peak < 16 * one, peak / one  # 11x here; the dicts were 50x
