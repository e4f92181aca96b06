"""Benchmark: the CPU targets of the end-to-end loop, measured and printed.

1. `nemo-rl-fp16 demo` (cached warm start + fp16 run + bf16 run + report), wall time;
   target <= 300 s on a 2-core machine.
2. Training accuracy each run reaches in the demo budget; target fp16 >= 0.95 (mean of the
   last 5 steps). bf16 and the ablation (fp16 trainer, bf16 rollout) are reported as they come.
3. Offline mismatch (`mismatch recipe=mismatch_tiny`): KL(µ‖π) k3 bf16 / fp16; target >= 24x.

    .venv/bin/python benchmarks/sanity_targets.py [--out outputs/bench] [--skip-ablation]

Run it on an otherwise idle machine: oversubscribed cores slow OpenMP down several-fold.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from nemo_rl_fp16.config import load_recipe
from nemo_rl_fp16.experiments import run_demo, run_mismatch
from nemo_rl_fp16.loggers import read_jsonl, summary_table
from nemo_rl_fp16.trainer import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--skip-ablation", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    quiet = Console(quiet=True)
    common = ["logging.progress=false", f"warm_start.cache_dir={out}/ws_cache"]

    t0 = time.perf_counter()
    run_demo([f"output_dir={out}/demo", *common], console=quiet)
    demo_s = time.perf_counter() - t0
    demo = json.loads((out / "demo" / "report.json").read_text())["runs"]
    final = {p: demo[p]["final_accuracy (mean of last 5 steps)"] for p in demo}

    if not args.skip_ablation:
        cfg = load_recipe("sanity_tiny", [*common, f"output_dir={out}/ablation", "trainer.resume=never",
                                          "precision.rollout=bf16", "precision.allow_mismatch=true"])
        run(cfg, console=quiet)
        rows = read_jsonl(out / "ablation" / "metrics.jsonl")
        final["fp16 train + bf16 rollout"] = sum(r["reward/accuracy"] for r in rows[-5:]) / 5
        ablation_kl = sum(r["mismatch/kl_k3"] for r in rows) / len(rows)

    mm = run_mismatch(load_recipe("mismatch_tiny", [*common, f"output_dir={out}/mismatch"]), console=quiet)
    ratio = mm["ratios"]["kl_k3_bf16_over_fp16"]

    lines = [
        ("demo wall time (target <= 300 s)", f"{demo_s:.0f} s"),
        *[(f"final accuracy {p}" + (" (target >= 0.95)" if p == "fp16" else ""), f"{a:.3f}") for p, a in final.items()],
        ("demo mean KL k3 fp16 / bf16", f"{demo['fp16']['mean_kl_k3']:.2e} / {demo['bf16']['mean_kl_k3']:.2e}"),
    ]
    if not args.skip_ablation:
        lines.append(("ablation mean KL k3", f"{ablation_kl:.2e}"))
    lines.append(("offline KL k3 bf16/fp16 (target >= 24x)", f"{ratio:.1f}x"))
    Console().print(summary_table("sanity targets (CPU)", lines))


if __name__ == "__main__":
    main()
