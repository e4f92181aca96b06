"""The validation stage every recipe command starts with, and its dry run."""

from __future__ import annotations

from omegaconf import DictConfig

from nemo_rl_fp16.config import to_yaml, typed
from nemo_rl_fp16.plan import check_run
from nemo_rl_fp16.plan_lines import format_plan


def validate(command: str, cfg: DictConfig, dry_run: bool) -> bool:
    """Run the validation stage (`plan.check_run`); with `dry_run` print the resolved recipe and the plan.

    Args:
        command (str): the command's name (printed in the plan's header).
        cfg (DictConfig): the loaded recipe.
        dry_run (bool): print the resolved recipe (YAML) and the plan to stdout.

    Returns:
        bool: `dry_run` (True: the command stops here).

    Raises:
        ConfigError: one line per refusal (exit 2).
        PrecisionMismatchError: an undeclared trainer/rollout ablation (exit 3).
    """
    plan = check_run(typed(cfg))  # the dry run's checks are the real run's: plan + environment
    if dry_run:
        print(to_yaml(cfg), end="")
        print(f"# plan ({command})\n{format_plan(plan)}")
    return dry_run
