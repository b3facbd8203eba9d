"""The undefended baseline."""

from raymia.defenses.base import DEFENSES, Defense
from raymia.registry import NoParams


@DEFENSES.register("none", NoParams, doc="No defense: plain cross-entropy training, raw outputs.")
class NoDefense(Defense):
    """Plain training with the recipe, outputs released as they are."""
