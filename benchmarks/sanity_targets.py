"""Benchmark: the demo's targets (issue "honest, portable mismatch evidence"), measured and printed.

For each CPU variant (`host`: this machine as it is; `avx2`: MKL/oneDNN/ATen capped to AVX2 and the
package's detection overridden, `scripts/cpu_variant.sh`), in a fresh subprocess:

1. `nemo-rl-fp16 demo` (warm start + fp16 run + bf16 run + report): wall time, target <= 300 s;
   fp16 final training accuracy, target >= 0.95; in-run pooled KL(µ‖π) k3 bf16 / fp16, target >= 10x.
2. `nemo-rl-fp16 mismatch recipe=mismatch_tiny`: offline KL bf16 / fp16, target >= 24x; fp32 at
   least 100x below fp16; KL by response length in bf16 (the paper's Fig. 2 shape).

Then the two variants side by side: each ratio within 1.5x of the other.

    python benchmarks/sanity_targets.py [--out outputs/bench] [--variants host,avx2]

Run it on an otherwise idle machine (two heavy jobs on 2 cores slow each other 3-10x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from nemo_rl_fp16.loggers import summary_table

ROOT = Path(__file__).resolve().parents[1]


def _measure(out: Path) -> dict:
    """Demo + offline mismatch in this process (its environment decides the CPU variant)."""
    from nemo_rl_fp16.commands.demo import run_demo
    from nemo_rl_fp16.commands.mismatch import run_mismatch
    from nemo_rl_fp16.config import load_recipe

    quiet = Console(quiet=True)
    t0 = time.perf_counter()
    run_demo([f"output_dir={out}/demo", f"warm_start.cache_dir={out}/ws_cache", "logging.progress=false"],
             console=quiet)
    demo_s = time.perf_counter() - t0
    demo = json.loads((out / "demo" / "report.json").read_text())
    mm = run_mismatch(load_recipe("mismatch_tiny", [f"output_dir={out}/mismatch", "logging.progress=false"]),
                      console=quiet)
    return {"demo_s": demo_s, "demo": demo, "mismatch": mm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--variants", default="host,avx2")
    ap.add_argument("--inner", help=argparse.SUPPRESS)  # one variant, run by the outer process
    args = ap.parse_args()
    if args.inner:
        res = _measure(Path(args.inner))
        (Path(args.inner) / "bench.json").write_text(json.dumps(res, indent=2))
        return
    results = {}
    for variant in args.variants.split(","):
        out = Path(args.out) / variant
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [str(ROOT / "scripts" / "cpu_variant.sh"), variant, sys.executable, __file__, "--inner", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results[variant] = json.loads((out / "bench.json").read_text())

    lines = []
    for v, r in results.items():
        demo, mm = r["demo"], r["mismatch"]
        f16, b16 = demo["runs"]["fp16"], demo["runs"]["bf16"]
        kl = {p: mm["runs"][p]["mismatch/kl_k3"] for p in mm["runs"]}
        spread = demo.get("kl_k3_step_ratio_bf16_over_fp16") or {}
        bf16_len = {k.rsplit("/", 1)[1]: f"{val:.1e}" for k, val in mm["runs"]["bf16"].items()
                    if k.startswith("mismatch/kl_by_length/")}
        lines += [
            (f"[{v}] numerics", f"{demo['numerics'].get('isa')} / {demo['numerics'].get('kernels')} / "
                                f"ATen {demo['numerics'].get('aten_capability')}"),
            (f"[{v}] demo wall time (target <= 300 s)", f"{r['demo_s']:.0f} s"),
            (f"[{v}] final accuracy fp16 (target >= 0.95) / bf16", f"{f16['final_accuracy']:.3f} / {b16['final_accuracy']:.3f}"),
            (f"[{v}] in-run pooled KL k3 fp16 / bf16", f"{f16['kl_k3_pooled']:.2e} / {b16['kl_k3_pooled']:.2e}"),
            (f"[{v}] in-run pooled KL bf16/fp16 (target >= 10x)", f"{demo['kl_k3_pooled_bf16_over_fp16']:.1f}x "
             f"(per step p10-p90 {spread.get('p10', 0):.1f}-{spread.get('p90', 0):.1f}x)"),
            (f"[{v}] steps with KL exactly 0, fp16 / bf16", f"{f16['frac_steps_kl_zero']:.2f} / {b16['frac_steps_kl_zero']:.2f}"),
            (f"[{v}] offline KL k3 fp32 / fp16 / bf16", f"{kl['fp32']:.1e} / {kl['fp16']:.1e} / {kl['bf16']:.1e}"),
            (f"[{v}] offline KL bf16/fp16 (target >= 24x)", f"{kl['bf16'] / kl['fp16']:.1f}x"),
            (f"[{v}] offline fp16/fp32 (target >= 100x)", "inf (fp32 KL 0)" if kl["fp32"] == 0 else f"{kl['fp16'] / kl['fp32']:.0f}x"),
            (f"[{v}] offline bf16 KL by length", ", ".join(f"{b}: {x}" for b, x in bf16_len.items())),
        ]
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        for name, fa, fb in (
            ("in-run bf16/fp16", ra["demo"]["kl_k3_pooled_bf16_over_fp16"], rb["demo"]["kl_k3_pooled_bf16_over_fp16"]),
            ("offline bf16/fp16", *(r["mismatch"]["ratios"]["kl_k3_bf16_over_fp16"] for r in (ra, rb))),
        ):
            lines.append((f"{name}: {a} / {b} (target within 1.5x)", f"{max(fa, fb) / min(fa, fb):.2f}x apart"))
        same = ra["mismatch"]["runs"]["fp16"] == rb["mismatch"]["runs"]["fp16"] and \
            ra["mismatch"]["runs"]["bf16"] == rb["mismatch"]["runs"]["bf16"]
        lines.append(("offline fp16/bf16 figures bitwise equal across variants", str(same)))
    Console().print(summary_table("demo targets (CPU)", lines))


if __name__ == "__main__":
    main()
