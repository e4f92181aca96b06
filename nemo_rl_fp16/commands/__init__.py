"""The console commands, one module each: `rl`, `mismatch`, `doctor`, `preflight`, `demo`, `launch`.

Each recipe command's module has `main(recipe, overrides, dry_run) -> int` (`launch`:
`launch_slurm(args)`); `cli.py` parses the command line and dispatches here, and maps errors to
exit codes. `validate` is the validation stage (and dry run) they share. Runs are assembled by
`assembly.py`; the RL loop is `trainer.py`.
"""
