"""Defenses: hooks that the bank applies identically to every model it trains (see base.py)."""

from raymia.defenses import advreg as _advreg  # noqa: F401,E402
from raymia.defenses import dpsgd as _dpsgd  # noqa: F401,E402
from raymia.defenses import hamp as _hamp  # noqa: F401,E402
from raymia.defenses import memguard as _memguard  # noqa: F401,E402

# Import modules for their registrations.
from raymia.defenses import none as _none  # noqa: F401,E402
from raymia.defenses import pruning as _pruning  # noqa: F401,E402
from raymia.defenses import relaxloss as _relaxloss  # noqa: F401,E402
from raymia.defenses import simple as _simple  # noqa: F401,E402
from raymia.defenses import tldmi as _tldmi  # noqa: F401,E402
from raymia.defenses import vae as _vae  # noqa: F401,E402
from raymia.defenses.base import DEFENSES, Defense, build_defense

__all__ = ["DEFENSES", "Defense", "build_defense"]
