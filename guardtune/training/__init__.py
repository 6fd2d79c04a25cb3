"""Training components shared by every recipe, and the end user's fine-tune recipe.

Components (`config`, `encode`, `loss`, `checkpoint`, `memory`, `progress`, `savings`) are plain
functions and frozen dataclasses; `finetune` is the recipe `guardtune finetune` runs. The mask
learner (`guardtune.learn`) and `guardtune.evaluate` import components, never the recipe.
"""
