"""`nemo-rl-fp16` console script (and the body behind `nemo llm rl ...`).

    nemo-rl-fp16 rl recipe=grpo_fp16 trainer.max_steps=3 precision=bf16 [dry_run=true]
    nemo-rl-fp16 mismatch recipe=mismatch_tiny
    nemo-rl-fp16 demo [output_dir=...]
    nemo-rl-fp16 recipes
    nemo-rl-fp16 launch slurm recipe=grpo_fp16 nodes=8 gpus_per_node=8 account=A partition=P [submit=true]

Arguments after the command are `recipe=NAME` plus OmegaConf dotlist overrides; `dry_run=true`
prints the resolved config and the plan and exits. Errors print one line per problem and exit
non-zero before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nemo_rl_fp16.config import ConfigError

COMMANDS = {
    "rl": ("grpo_fp16", "run RL fine-tuning from a recipe"),
    "mismatch": ("mismatch_tiny", "offline π-vs-µ mismatch check across precisions (paper Fig. 2)"),
    "demo": ("demo_tiny", "CPU sanity demo: warm start, fp16 run, bf16 run, side-by-side report"),
}
EXIT_CONFIG, EXIT_PRECISION, EXIT_INPUT = 2, 3, 4
_TRUE = {"1", "true", "yes", "on"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemo-rl-fp16",
        description="RL fine-tuning of LLMs in FP16 end to end (arXiv 2510.26788).",
        epilog="Example: nemo-rl-fp16 rl recipe=sanity_tiny trainer.max_steps=3 dry_run=true",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (default, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=f"{help_}. Default recipe: {default}.")
        sp.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="recipe=NAME|PATH, dry_run=true, and key=value overrides")
    sub.add_parser("recipes", help="list the packaged recipes")
    sl = sub.add_parser("launch", help="write (and optionally submit) a cluster launch script",
                        description="Write an sbatch script (Ray head + workers, then the rl run); "
                                    "see nemo_rl_fp16/launch.py and docs/scaling.md.")
    sl.add_argument("target", choices=["slurm"], help="scheduler")
    sl.add_argument("overrides", nargs=argparse.REMAINDER,
                    help="recipe=NAME, nodes=, gpus_per_node=, time=, account=, partition=, image=, mounts=, "
                         "submit=true|false, script=PATH, and recipe key=value overrides")
    return p


def split_args(command: str, args: Sequence[str]) -> tuple[str, list[str], bool]:
    """(recipe, overrides, dry_run) from `recipe=...`, `dry_run=...` and the other key=values."""
    recipe, dry_run, overrides = COMMANDS[command][0], False, []
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"argument '{a}' is not key=value (e.g. recipe=grpo_fp16 or trainer.max_steps=3)")
        if key == "recipe":
            recipe = value
        elif key in ("dry_run", "+dry_run"):
            dry_run = value.lower() in _TRUE
        else:
            overrides.append(a)
    return recipe, overrides, dry_run


def run_command(command: str, args: Sequence[str]) -> int:
    """Run one command with its key=value arguments; returns the exit code."""
    from nemo_rl_fp16.checkpoint import CheckpointError
    from nemo_rl_fp16.data.jsonl import DataError
    from nemo_rl_fp16.precision import PrecisionMismatchError

    try:
        if command == "recipes":
            from nemo_rl_fp16.config import available_recipes

            print("\n".join(available_recipes()))
            return 0
        if command == "launch":
            from nemo_rl_fp16.launch import launch_slurm

            return launch_slurm(args)
        recipe, overrides, dry_run = split_args(command, args)
        if command == "demo":
            from nemo_rl_fp16.experiments import run_demo

            return run_demo(overrides, recipe=recipe, dry_run=dry_run)
        from nemo_rl_fp16.config import load_recipe, to_yaml, typed
        from nemo_rl_fp16.plan import check_run, format_plan

        cfg = load_recipe(recipe, overrides)
        if command == "rl" and not dry_run:  # `run` starts with the same validation stage (`check_run`)
            from nemo_rl_fp16.trainer import run

            run(cfg)
            return 0
        plan = check_run(typed(cfg))  # the dry run's checks are the real run's: plan + environment
        if dry_run:
            print(to_yaml(cfg), end="")
            print(f"# plan ({command})\n{format_plan(plan)}")
            return 0
        from nemo_rl_fp16.experiments import run_mismatch

        run_mismatch(cfg)
        return 0
    except ConfigError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except PrecisionMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PRECISION
    except (DataError, CheckpointError) as e:  # bad dataset rows, corrupt checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    return run_command(ns.command, getattr(ns, "overrides", []))  # launch: target is always slurm


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
