"""Model inversion (MI): attacks that reconstruct class-representative inputs from a trained model, and
their scoring (`raymia.inversion.evaluation`).

Each attack module registers its entry in `INVERSION`; the registry imports every module of this package
the first time it is read (raymia.plugins), so adding an attack is adding a module (docs/extending.md).
"""

from raymia.inversion.registry import INVERSION, InversionContext, InversionFn, Reconstructions, run_inversion

__all__ = ["INVERSION", "InversionContext", "InversionFn", "Reconstructions", "run_inversion"]
