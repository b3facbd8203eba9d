"""Out-of-distribution points appended to the signals (`Signals.fit_mask`): every attack scores them, fits
on the audited points only, and leaves the audited points' scores exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

from raymia.attacks import ATTACKS, run_attack
from raymia.data.plan import paired_keep
from raymia.signals import Signals


def _signals(rng, m=8, p=120, n_ood=40, c=5, q=2):
    keep = paired_keep(m, p, rng)
    labels = rng.integers(0, c, p)
    logits = rng.normal(size=(m, q, p, c)).astype(np.float32)
    logits[:, :, np.arange(p), labels] += 2.0 * keep[:, None, :]  # members score higher on their label
    pop = rng.normal(size=(m, q, 60, c)).astype(np.float32)
    ood = (rng.normal(size=(m, q, n_ood, c)) * 3).astype(np.float32)  # far from the audited points
    base = Signals(logits=logits, labels=labels, keep=keep, pop_logits=pop, pop_labels=rng.integers(0, c, 60))
    ext = Signals(logits=np.concatenate([logits, ood], axis=2),
                  labels=np.concatenate([labels, rng.integers(0, c, n_ood)]),
                  keep=np.concatenate([keep, np.zeros((m, n_ood), dtype=bool)], axis=1),
                  pop_logits=base.pop_logits, pop_labels=base.pop_labels,
                  fit_mask=np.concatenate([np.ones(p, dtype=bool), np.zeros(n_ood, dtype=bool)]))
    return base, ext


@pytest.mark.parametrize("name", sorted(e.name for e in ATTACKS.entries()))
def test_appended_points_leave_every_audited_score_unchanged(name):
    base, ext = _signals(np.random.default_rng(0))
    params = {"max_train": 2000, "max_iter": 50} if name in ("shokri", "salem") else {}
    for target in (0, 3):
        before = run_attack(name, params, base, target)
        after = run_attack(name, params, ext, target)
        assert after.shape == (ext.num_points,) and np.isfinite(after).all()
        np.testing.assert_allclose(after[: base.num_points], before, rtol=1e-12, atol=1e-12, err_msg=name)


def test_the_pairing_and_its_checks_read_the_fit_points():
    base, ext = _signals(np.random.default_rng(1))
    assert ext.paired_model(0) == 1 and np.array_equal(ext.shadow_mask(0), base.shadow_mask(0))
    with pytest.raises(ValueError, match="non-members of every model"):
        Signals(logits=ext.logits, labels=ext.labels, keep=np.ones_like(ext.keep), fit_mask=ext.fit_mask)
    with pytest.raises(ValueError, match="fit_mask must be bool"):
        Signals(logits=ext.logits, labels=ext.labels, keep=ext.keep, fit_mask=np.zeros(ext.num_points, bool))
