"""The `demo` command: the CPU sanity demo, fp16 vs bf16 on the same task, seed and budget.

    nemo-rl-fp16 demo [output_dir=...] [dry_run=true]

Warm start once (cached), then the demo recipe (`demo_tiny`: long written-out additions) in fp16
and in bf16 through the `rl` command's driver (`commands.rl.run`), then the side-by-side report
of `demo_report.py` (pooled KL, per-step spread, KL by length, accuracy, numerics record).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from nemo_rl_fp16.assembly import resolve_device
from nemo_rl_fp16.commands import rl
from nemo_rl_fp16.config import load_recipe, typed
from nemo_rl_fp16.demo_report import write_demo_report
from nemo_rl_fp16.loggers import summary_table
from nemo_rl_fp16.precision.cpu_numerics import numerics_record
from nemo_rl_fp16.runtime import torch_threads

DEMO_PRECISIONS = ("fp16", "bf16")


def main(recipe: str, overrides: list[str], dry_run: bool) -> int:
    """`nemo-rl-fp16 demo`: `run_demo` with the command line's recipe and overrides.

    Args:
        recipe (str): the demo recipe (default `demo_tiny`).
        overrides (list[str]): OmegaConf dotlist overrides (`output_dir` is the demo's root).
        dry_run (bool): validate both runs and print their plans only.

    Returns:
        int: the exit code.
    """
    return run_demo(overrides, recipe=recipe, dry_run=dry_run)


def run_demo(overrides: list[str], recipe: str = "demo_tiny", dry_run: bool = False,
             console: Console | None = None) -> int:
    """Warm start, then the recipe in fp16 and bf16 (same seed and budget), then a report.

    Args:
        overrides (list[str]): OmegaConf dotlist overrides for both runs; `output_dir=ROOT` puts
            the runs in `ROOT/fp16`, `ROOT/bf16` and the report in `ROOT` (default `outputs/demo`).
        recipe (str): the recipe both runs use.
        dry_run (bool): validate both runs and print their plans only.
        console (Console | None): where the runs and the summary report.

    Returns:
        int: the exit code (0).

    Raises:
        ConfigError: a bad recipe or override, for either run, before any work (exit 2).
    """
    console = console or Console()
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "outputs/demo")
    rest = [o for o in overrides if not o.startswith("output_dir=")]
    per_run = {p: ["trainer.resume=never", *rest, f"precision={p}", f"output_dir={root}/{p}"] for p in DEMO_PRECISIONS}
    if dry_run:
        for p in DEMO_PRECISIONS:
            rl.main(recipe, per_run[p], dry_run=True)
        return 0
    cfgs = {p: load_recipe(recipe, per_run[p]) for p in DEMO_PRECISIONS}  # all config errors before work
    t0 = time.perf_counter()
    finals = {}
    # One torch thread: the tiny model is overhead-bound, and two OpenMP threads spinning against
    # any other process on a 2-core machine made a rollout 8x slower (measured 11.1 s vs 1.4 s).
    with torch_threads(1):
        for p, cfg in cfgs.items():
            console.rule(f"{cfg.recipe}: {p}")
            finals[p] = rl.run(cfg, console=console)
    summary = write_demo_report(Path(root), {p: Path(cfgs[p].output_dir) for p in DEMO_PRECISIONS},
                                numerics=numerics_record(resolve_device(typed(cfgs["fp16"]))),
                                extra={"wall_s": time.perf_counter() - t0})
    keys = ("kl_k3_pooled", "kl_k3_median_step", "frac_steps_kl_zero", "final_accuracy", "peak_accuracy")
    rows = [(f"{p} {k}", "n/a" if s[k] is None else f"{s[k]:.4g}") for p, s in summary["runs"].items() for k in keys]
    if summary.get("kl_k3_pooled_bf16_over_fp16") is not None:
        rows.append(("pooled KL bf16 / fp16", f"{summary['kl_k3_pooled_bf16_over_fp16']:.1f}x"))
    rows += [("total wall time", f"{summary['wall_s']:.0f}s"), ("report", str(Path(root) / "report.md"))]
    console.print(summary_table("demo: fp16 vs bf16", rows))
    return 0
