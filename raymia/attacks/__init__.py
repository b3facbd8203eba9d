"""Attacks on trained models. Membership inference attacks live in raymia.attacks.mia.

Each attack module registers its entries in `ATTACKS`; the registry imports every module of this package
the first time it is read (raymia.plugins), so adding an attack is adding a module (docs/extending.md).
"""

from raymia.attacks.registry import ATTACKS, AttackFn, run_attack

__all__ = ["ATTACKS", "AttackFn", "run_attack"]
