"""Recipes: OmegaConf YAML composed with `defaults:`, dotlist overrides, a strict typed schema.

Load -> compose -> override -> resolve -> validate, then hand a typed `RecipeConfig` to the
trainer. Every problem (unknown key, wrong type, bad choice) is reported at once, before any
work starts, as one line per problem naming the key, the value, the allowed values and the
nearest valid key.

- `schema`: the pydantic sections of `RecipeConfig`, `ConfigError`, `validate`, `typed`.
- `loading`: `load_recipe` (find, compose, override, validate), `available_recipes`, `save_resolved`.

Both are re-exported here: `from nemo_rl_fp16.config import load_recipe, typed, RecipeConfig`.
"""

from nemo_rl_fp16.config.loading import available_recipes, load_recipe, recipes_dir, save_resolved, to_yaml
from nemo_rl_fp16.config.schema import (
    AlgorithmSection,
    ClusterSection,
    ConfigError,
    DataSection,
    DtypeName,
    LoggingSection,
    LoraSection,
    LossScaleSection,
    MismatchSection,
    ModelSection,
    PolicySection,
    PrecisionSection,
    Preset,
    RaySection,
    RecipeConfig,
    RewardSection,
    RolloutSection,
    ToggleSection,
    TrainerSection,
    WarmStartSection,
    refuse,
    typed,
    validate,
)

__all__ = [
    "AlgorithmSection", "ClusterSection", "ConfigError", "DataSection", "DtypeName", "LoggingSection", "LoraSection",
    "LossScaleSection", "MismatchSection", "ModelSection", "PolicySection", "PrecisionSection", "Preset",
    "RaySection", "RecipeConfig", "RewardSection", "RolloutSection", "ToggleSection", "TrainerSection",
    "WarmStartSection", "available_recipes", "load_recipe", "recipes_dir", "refuse", "save_resolved", "to_yaml",
    "typed", "validate",
]
