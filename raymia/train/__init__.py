"""Training: the recipe, the bank trainer (packs of models) and eval-mode inference with query augmentations."""
