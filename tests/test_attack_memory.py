"""What the attacks cost at scale: extra memory against the size of the signals, transforms computed once for
every target, and the same scores as the plain computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raymia.attacks import run_attack
from raymia.attacks.mia import cross_entropy
from raymia.attacks.mia.label_only import agreement
from raymia.attacks.mia.reference import out_cdf
from raymia.data.plan import paired_keep
from raymia.signals import Signals

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: every attack on 2 targets of 16 models x 2 queries x 20,000 points x 10 classes (25.6 MB
# of float32 logits), each after the kernel's peak-RSS counter was reset (/proc/self/clear_refs), so each
# attack's peak is its own. A first call on small signals imports what the attack imports (scikit-learn:
# about 100 MB) before anything is measured.
_MEASURE = """
import json, sys
import numpy as np
from raymia.attacks import ATTACKS, run_attack
from raymia.data.plan import paired_keep
from raymia.signals import Signals

def signals(m, p, q, c, z):
    rng = np.random.default_rng(0)
    keep = paired_keep(m, p, rng)
    labels = rng.integers(0, c, p)
    logits = rng.standard_normal((m, q, p, c), dtype=np.float32)
    logits[:, :, np.arange(p), labels] += (1.0 + keep)[:, None, :]
    return Signals(logits=logits, labels=labels, keep=keep, pop_logits=rng.standard_normal((m, q, z, c), dtype=np.float32),
                   pop_labels=rng.integers(0, c, z))

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

light = {"shokri": {"max_train": 2000, "max_iter": 5}, "salem": {"max_train": 2000, "max_iter": 5},
         "label_only": {"calibrated": True}}
small, big = signals(8, 400, 2, 10, 100), signals(16, 20_000, 2, 10, 2_000)
size = big.logits.nbytes + big.pop_logits.nbytes
out = {}
for name in ATTACKS.names():
    run_attack(name, light.get(name), small, 0)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    for t in (0, 2):
        run_attack(name, light.get(name), big, t)
    big.forget_derived()
    out[name] = (status("VmHWM:") - base) / size
print(json.dumps(out))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_no_attack_holds_more_than_twice_its_signals():
    """Every transform widens one model's outputs to float64 at a time (`per_model`): the reference attack
    widened the whole bank at once, 5.7 times the signals."""
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(ratios) >= 14
    assert {a: r for a, r in ratios.items() if r > 2.0} == {}, ratios


def _signals(m: int = 8, p: int = 500, q: int = 2, c: int = 5) -> Signals:
    rng = np.random.default_rng(3)
    keep = paired_keep(m, p, rng)
    labels = rng.integers(0, c, p)
    logits = rng.normal(0, 2, (m, q, p, c)).astype(np.float32)
    logits[:, :, np.arange(p), labels] += 2.0 * keep[:, None, :]
    return Signals(logits=logits, labels=labels, keep=keep)


@pytest.mark.parametrize("target", [0, 5])
def test_reference_scores_are_those_of_the_whole_bank_at_once(target):
    sig = _signals()
    losses = cross_entropy(sig.logits, sig.labels)  # [M, Q, P]: every model widened at once
    shadow = sig.shadow_mask(target)
    plain = -out_cdf(losses[target], losses[shadow], ~sig.keep[shadow]).mean(axis=0)
    np.testing.assert_array_equal(run_attack("reference", None, sig, target), plain)


def test_calibrated_label_only_counts_each_model_once_for_every_target():
    sig = _signals()
    for target in range(sig.num_models):
        shadows = sig.shadows_of(target)
        sh_agree = np.stack([agreement(sig.logits[m], sig.labels) for m in shadows])  # the plain count
        out = ~sig.keep[shadows]
        n_out = out.sum(axis=0)
        ref = np.sum(np.where(out, sh_agree, 0.0), axis=0) / n_out
        scores = run_attack("label_only", {"calibrated": True}, sig, target)
        np.testing.assert_array_equal(scores, agreement(sig.logits[target], sig.labels) - ref)
    # one [M, P] count, shared: 8 targets did not count the 6 shadows' agreement 8 times
    (agree,) = (v for k, v in sig._derived.items() if k[0] == "label_only agreement")
    assert agree.shape == (sig.num_models, sig.num_points)
    plain = run_attack("label_only", None, sig, 1)
    plain[0] += 1  # the uncalibrated scores are the caller's, not a view of what the targets share
    np.testing.assert_array_equal(agree[1], agreement(sig.logits[1], sig.labels))
