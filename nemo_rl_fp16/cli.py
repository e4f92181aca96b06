"""`nemo-rl-fp16` console script (and the body behind `nemo llm rl ...`): parse, dispatch, exit code.

    nemo-rl-fp16 rl recipe=grpo_fp16 trainer.max_steps=3 precision=bf16 [dry_run=true]
    nemo-rl-fp16 mismatch recipe=mismatch_tiny
    nemo-rl-fp16 doctor recipe=mismatch_tiny [precision=fp16,bf16]
    nemo-rl-fp16 preflight recipe=grpo_fp16
    nemo-rl-fp16 demo [output_dir=...]
    nemo-rl-fp16 rehearse recipe=dense_14b_fp16 [rehearse.nodes=2 rehearse.trainer_ranks=4]
    nemo-rl-fp16 recipes
    nemo-rl-fp16 launch slurm recipe=grpo_fp16 nodes=8 gpus_per_node=8 account=A partition=P [submit=true]

Arguments after the command are `recipe=NAME` plus OmegaConf dotlist overrides; `dry_run=true`
prints the resolved config and the plan and exits. Errors a user can cause print one line per
problem (`error: ...`) and exit with a code saying what kind of problem it was (`EXIT_CODES`,
docs/runs.md); `--traceback` (or `NEMO_RL_TRACEBACK=1`) shows the full Python trace instead, for
bug reports. An unexpected exception is one line too, exit 1, with that hint.

This module only parses the command line and dispatches to the command's module in
`nemo_rl_fp16.commands` (imported on use, so `--help` stays fast); the commands never import it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence

from nemo_rl_fp16.config import ConfigError

COMMANDS = {
    "rl": ("grpo_fp16", "run RL fine-tuning from a recipe"),
    "mismatch": ("mismatch_tiny", "offline π-vs-µ mismatch check across precisions (paper Fig. 2)"),
    "doctor": ("mismatch_tiny", "where π and µ part, layer by layer, per precision (docs/doctor.md)"),
    "preflight": ("grpo_fp16", "will fp16 overflow or underflow on this model? activation headroom, gradient "
                               "underflow at the initial loss scale (docs/doctor.md)"),
    "demo": ("demo_tiny", "CPU sanity demo: warm start, fp16 run, bf16 run, side-by-side report"),
    "rehearse": ("dense_14b_fp16", "a recipe's parallel layout, shrunk, 2 RL steps on a simulated multi-node CPU Ray "
                                   "cluster (docs/scaling.md)"),
}
EXIT_BUG, EXIT_CONFIG, EXIT_PRECISION, EXIT_INPUT, EXIT_NONFINITE, EXIT_STORAGE = 1, 2, 3, 4, 5, 6
#: exit code -> meaning (documented in docs/runs.md)
EXIT_CODES = {
    0: "success",
    EXIT_BUG: "unexpected error (a bug: rerun with --traceback and report it)",
    EXIT_CONFIG: "bad recipe, override or argument; output_dir of another run, locked, a file or not writable; "
                 "a model folder that is not an HF model",
    EXIT_PRECISION: "precision audit: an engine does not run the declared dtypes",
    EXIT_INPUT: "bad input data (dataset rows, files), corrupt or unusable checkpoint",
    EXIT_NONFINITE: "non-finite reward, loss, gradient or weight (nothing was saved)",
    EXIT_STORAGE: "disk full or read-only while writing (the last checkpoint is intact)",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemo-rl-fp16",
        description="RL fine-tuning of LLMs in FP16 end to end (arXiv 2510.26788).",
        epilog="Example: nemo-rl-fp16 rl recipe=sanity_tiny trainer.max_steps=3 dry_run=true. Exit codes: "
               + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("--traceback", action="store_true",
                   help="show the full Python trace of an error (also: NEMO_RL_TRACEBACK=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (default, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=f"{help_}. Default recipe: {default}.")
        sp.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="recipe=NAME|PATH, dry_run=true, and key=value overrides")
    sub.add_parser("recipes", help="list the packaged recipes")
    sl = sub.add_parser("launch", help="write (and optionally submit) a cluster launch script",
                        description="Write an sbatch script (Ray head + workers, then the rl run); "
                                    "see nemo_rl_fp16/commands/launch.py and docs/scaling.md.")
    sl.add_argument("target", choices=["slurm"], help="scheduler")
    sl.add_argument("overrides", nargs=argparse.REMAINDER,
                    help="recipe=NAME, nodes=, gpus_per_node=, time=, account=, partition=, image=, mounts=, "
                         "submit=true|false, script=PATH, and recipe key=value overrides")
    return p


def split_args(command: str, args: Sequence[str]) -> tuple[str, list[str], bool]:
    """(recipe, overrides, dry_run) from `recipe=...`, `dry_run=...` and the other key=values.

    Args:
        command (str): the command name (a key of `COMMANDS`; gives the default recipe).
        args (Sequence[str]): the command line's `key=value` words.

    Returns:
        tuple[str, list[str], bool]: the recipe name or path, the other `key=value` words in order
            (OmegaConf dotlist overrides), and whether `dry_run` (or `+dry_run`) is true.

    Raises:
        ConfigError: a word without `=`, or a `dry_run` value that is not a boolean.
    """
    recipe, dry_run, overrides = COMMANDS[command][0], False, []
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"argument '{a}' is not key=value (e.g. recipe=grpo_fp16 or trainer.max_steps=3)")
        if key == "recipe":
            recipe = value
        elif key in ("dry_run", "+dry_run"):
            if value.lower() not in _TRUE | _FALSE:  # a typo must not start the real run
                raise ConfigError(f"bad value for 'dry_run': {value!r}; allowed: true or false (also 1/0, yes/no, "
                                  "on/off)")
            dry_run = value.lower() in _TRUE
        else:
            overrides.append(a)
    return recipe, overrides, dry_run


def _one_line(e: BaseException) -> str:
    from nemo_rl_fp16.checkpoint import StorageError

    text = e.strerror if isinstance(e, StorageError) and e.strerror else str(e)
    return " ".join(text.split()) or type(e).__name__


def run_command(command: str, args: Sequence[str], show_traceback: bool | None = None) -> int:
    """Run one command with its key=value arguments; returns the exit code (`EXIT_CODES`).

    An error becomes one `error: ...` line on stderr and its exit code; an exception of no known
    kind is a bug (exit 1).

    Args:
        command (str): `rl`, `mismatch`, `demo`, `doctor`, `preflight` or `launch`.
        args (Sequence[str]): its `key=value` arguments.
        show_traceback (bool | None): print the traceback before the one-line error; None reads the
            `NEMO_RL_TRACEBACK` environment variable.

    Returns:
        int: the exit code: 0, `EXIT_CONFIG` (2) for a bad recipe or argument, `EXIT_PRECISION` (3),
            `EXIT_INPUT` (4: data or checkpoint), `EXIT_NONFINITE` (5), `EXIT_STORAGE` (6), or
            `EXIT_BUG` (1) for an unexpected exception (`EXIT_CODES`).
    """
    from nemo_rl_fp16.checkpoint import CheckpointError, StorageError
    from nemo_rl_fp16.data.jsonl import DataError
    from nemo_rl_fp16.guards import NonFiniteError
    from nemo_rl_fp16.precision import PrecisionMismatchError

    if show_traceback is None:
        show_traceback = os.environ.get("NEMO_RL_TRACEBACK", "").lower() in _TRUE
    try:
        return _run_command(command, args)
    except ConfigError as e:
        if show_traceback:
            traceback.print_exc()
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        if show_traceback:
            traceback.print_exc()
        kinds = ((PrecisionMismatchError, EXIT_PRECISION), (NonFiniteError, EXIT_NONFINITE),
                 (StorageError, EXIT_STORAGE), ((DataError, CheckpointError), EXIT_INPUT))
        code = next((c for t, c in kinds if isinstance(e, t)), None)
        if code is None and isinstance(e, OSError) and e.errno is not None:  # a user's disk, folder or file
            code = EXIT_STORAGE if e.errno in _STORAGE_ERRNOS else EXIT_INPUT
        if code is None:
            if not show_traceback:
                print(f"error: unexpected {type(e).__name__}: {_one_line(e)[:500]} (a bug: rerun with --traceback "
                      "or NEMO_RL_TRACEBACK=1 and report the trace)", file=sys.stderr)
            return EXIT_BUG
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return code


def _run_command(command: str, args: Sequence[str]) -> int:
    if command == "recipes":
        from nemo_rl_fp16.config import available_recipes

        print("\n".join(available_recipes()))
        return 0
    if command == "launch":
        from nemo_rl_fp16.commands.launch import launch_slurm

        return launch_slurm(args)
    recipe, overrides, dry_run = split_args(command, args)
    if command == "rl":
        from nemo_rl_fp16.commands.rl import main as command_main
    elif command == "mismatch":
        from nemo_rl_fp16.commands.mismatch import main as command_main
    elif command == "doctor":
        from nemo_rl_fp16.commands.doctor import main as command_main
    elif command == "preflight":
        from nemo_rl_fp16.commands.preflight import main as command_main
    elif command == "rehearse":
        from nemo_rl_fp16.commands.rehearse import main as command_main
    else:
        from nemo_rl_fp16.commands.demo import main as command_main
    return command_main(recipe, overrides, dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse `argv` (default `sys.argv[1:]`), run the command, return its exit code.

    Args:
        argv (Sequence[str] | None): the arguments after the program name; None reads `sys.argv[1:]`.

    Returns:
        int: the exit code (`run_command`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    return run_command(ns.command, getattr(ns, "overrides", []), show_traceback=ns.traceback or None)  # launch: target is always slurm


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
