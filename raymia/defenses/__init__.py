"""Defenses: hooks that the bank applies identically to every model it trains (see base.py).

Each defense module registers its entries in `DEFENSES`; the registry imports every module of this package
the first time it is read (raymia.plugins), so adding a defense is adding a module (docs/extending.md).
"""

from raymia.defenses.base import DEFENSES, Defense, build_defense

__all__ = ["DEFENSES", "Defense", "build_defense"]
