"""Attacks on trained models. Membership inference attacks live in raymia.attacks.mia."""

# The attack modules are imported for their registrations in ATTACKS.
from raymia.attacks.mia import label_only as _label_only  # noqa: F401
from raymia.attacks.mia import learned as _learned  # noqa: F401
from raymia.attacks.mia import lira as _lira  # noqa: F401
from raymia.attacks.mia import rmia as _rmia  # noqa: F401
from raymia.attacks.mia import threshold as _threshold  # noqa: F401
from raymia.attacks.registry import ATTACKS, AttackFn, run_attack

__all__ = ["ATTACKS", "AttackFn", "run_attack"]
