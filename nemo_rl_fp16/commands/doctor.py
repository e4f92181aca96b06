"""The `doctor` command: where π and µ part, layer by layer, per precision (docs/doctor.md).

    nemo-rl-fp16 doctor recipe=mismatch_tiny [precision=fp16,bf16]

`precision=` is the doctor's list of precisions to replay, not the run's preset; the work is
`doctor_report.run_doctor`.
"""

from __future__ import annotations

from nemo_rl_fp16.commands.validate import validate
from nemo_rl_fp16.config import load_recipe
from nemo_rl_fp16.doctor_report import parse_precisions, run_doctor


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 doctor`: validate, then `doctor_report.run_doctor` (or print the plan with `dry_run`).

    Args:
        recipe (str): a packaged recipe name or a YAML path.
        overrides (list[str]): OmegaConf dotlist overrides; `precision=a,b` lists the precisions.
        dry_run (bool): validate and print only.

    Returns:
        int: the exit code (0; errors are raised and mapped by `cli.run_command`).
    """
    keys = ("precision", "+precision")
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in keys]
    overrides = [o for o in overrides if o.split("=", 1)[0] not in keys]
    precisions = parse_precisions(given[-1], ()) if given else None
    cfg = load_recipe(recipe, overrides)
    if not validate("doctor", cfg, dry_run):
        run_doctor(cfg, precisions)
    return 0
