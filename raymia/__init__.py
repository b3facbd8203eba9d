"""raymia: distributed evaluation of privacy attacks on ML models and the defenses against them."""

import os as _os

# Read by Ray when it is imported, so set before: Ray's log deduplication merges lines that differ only in
# their numbers ("trial 1: ...", "trial 2: ..."), which are exactly raymia's progress lines. A value in the
# environment wins.
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")

__version__ = "0.1.0"
