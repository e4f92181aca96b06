"""The `preflight` command: will fp16 overflow or underflow on this model? (docs/doctor.md).

    nemo-rl-fp16 preflight recipe=grpo_fp16

Activation headroom and gradient underflow at the initial loss scale, on the run's starting
weights; the work is `preflight.run_preflight`.
"""

from __future__ import annotations

from nemo_rl_fp16.commands.validate import validate
from nemo_rl_fp16.config import load_recipe
from nemo_rl_fp16.preflight import run_preflight


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 preflight`: validate, then `preflight.run_preflight` (or print the plan with `dry_run`).

    Args:
        recipe (str): a packaged recipe name or a YAML path.
        overrides (list[str]): OmegaConf dotlist overrides.
        dry_run (bool): validate and print only.

    Returns:
        int: the exit code (0, or 2 when unsafe and `precision.preflight=refuse`).
    """
    cfg = load_recipe(recipe, overrides)
    if validate("preflight", cfg, dry_run):
        return 0
    return run_preflight(cfg)
