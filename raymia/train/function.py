"""Your own training function for the bank's models (`train.function`), for recipes raymia's loop lacks.

Named by import path (`module:function`) or registered by a plug-in (`@TRAINERS.register(name, Params)`,
docs/extending.md); called once per bank model as `fn(job, params)` with a `FitJob`: `job.model` freshly
initialised from the model's own seed, its members `job.x`, `job.y` on `job.device`, `job.recipe` (the
spec's `train:` block), `job.seed` for every random choice. It returns the trained model; raymia queries it
in eval mode exactly as it queries its own models, so the target (a checkpoint trained the same way) and
the shadows differ only in their data and seed.
"""

from __future__ import annotations

from typing import Any

from raymia.registry import Registry

TRAINERS: Registry[Any] = Registry("training function")
