"""The paper's experiments as commands: the offline mismatch check and the sanity demo.

- `run_mismatch`: for each precision, the rollout engine samples responses token by token (KV
  cache) and the trainer scores the same tokens in one pass; `report.write_report` turns the
  log-probs into KL(µ‖π) tables and plots (arXiv 2510.26788, Fig. 2).
- `run_demo`: warm start once (cached), then the same sanity recipe in fp16 and in bf16 with the
  same seed and budget, then a side-by-side report of accuracy and mismatch curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.build import build_rollout_engine, build_tokenizer, initial_weights, resolve_device
from nemo_rl_fp16.config import load_recipe, save_resolved, typed
from nemo_rl_fp16.data import get_dataset
from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.interfaces import SamplingParams
from nemo_rl_fp16.loggers import read_jsonl, summary_table
from nemo_rl_fp16.precision import PrecisionPolicy


def run_mismatch(cfg: DictConfig, console: Console | None = None) -> dict:
    """Offline π-vs-µ mismatch for each precision in `mismatch.precisions`; returns report.json."""
    from nemo_rl_fp16.policy import TorchPolicyTrainer
    from nemo_rl_fp16.report import write_report

    console = console or Console()
    rc = typed(cfg)
    out = Path(rc.output_dir)
    save_resolved(cfg, out)
    device = resolve_device(rc.device)
    tokenizer = build_tokenizer(rc)
    problems = get_dataset(rc.data.model_dump(), seed=rc.seed)
    prompts = [tokenizer(problems[i % len(problems)].prompt)["input_ids"] for i in range(rc.mismatch.num_prompts)]
    init = initial_weights(rc, tokenizer, problems, console)
    model_cfg = rc.model.model_dump()
    params = SamplingParams(max_new_tokens=rc.rollout.max_new_tokens, temperature=rc.rollout.temperature,
                            top_p=rc.rollout.top_p, num_generations=rc.rollout.num_generations, seed=rc.seed,
                            stop_token_ids=(tokenizer.eos_token_id,))
    runs = {}
    for name in rc.mismatch.precisions:
        t0 = time.perf_counter()
        pol = PrecisionPolicy.from_name(name)
        engine = build_rollout_engine(rc, pol, model_cfg, tokenizer, device, initial_state_dict=init,
                                      model_dir=out / "rollout_model" / name)
        scorer = TorchPolicyTrainer(model_cfg, pol, lr=rc.policy.lr, weight_decay=0.0, max_grad_norm=1.0,
                                    micro_batch_size=rc.policy.micro_batch_size, seed=rc.seed, device=device,
                                    initial_state_dict=init)
        batch = engine.generate(prompts, params)
        if hasattr(engine, "shutdown"):  # vLLM: free its KV cache before the next precision
            engine.shutdown()
        train_logp = scorer.logprobs(batch, rc.rollout.temperature)
        runs[name] = {"train_logp": train_logp, "rollout_logp": batch.rollout_logp, "mask": batch.response_mask}
        console.print(f"{name}: {batch.num_samples} samples, {int(batch.response_mask.sum())} tokens "
                      f"({time.perf_counter() - t0:.1f}s)")
    report = write_report(out, runs, title=f"π vs µ mismatch: {rc.recipe}",
                          length_buckets=rc.mismatch.length_buckets, seed=rc.seed)
    rows = [(f"KL(µ‖π) k3 {name}", f"{report['runs'][name]['mismatch/kl_k3']:.3e}") for name in runs]
    rows += [(k, "n/a" if v is None else f"{v:.1f}x") for k, v in report["ratios"].items()]
    rows.append(("report", str(out / "report.md")))
    console.print(summary_table("mismatch", rows))
    return report


DEMO_PRECISIONS = ("fp16", "bf16")


def run_demo(overrides: list[str], recipe: str = "sanity_tiny", dry_run: bool = False,
             console: Console | None = None) -> int:
    """Warm start, then the recipe in fp16 and bf16 (same seed and budget), then a report."""
    from nemo_rl_fp16.cli import run_command
    from nemo_rl_fp16.trainer import run

    console = console or Console()
    root = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), "outputs/demo")
    rest = [o for o in overrides if not o.startswith("output_dir=")]
    per_run = {p: ["trainer.resume=never", *rest, f"precision={p}", f"output_dir={root}/{p}"] for p in DEMO_PRECISIONS}
    if dry_run:
        for p in DEMO_PRECISIONS:
            code = run_command("rl", [f"recipe={recipe}", "dry_run=true", *per_run[p]])
            if code:
                return code
        return 0
    cfgs = {p: load_recipe(recipe, per_run[p]) for p in DEMO_PRECISIONS}  # all config errors before work
    t0 = time.perf_counter()
    finals = {}
    for p, cfg in cfgs.items():
        console.rule(f"{cfg.recipe}: {p}")
        finals[p] = run(cfg, console=console)
    summary = write_demo_report(Path(root), {p: Path(cfgs[p].output_dir) for p in DEMO_PRECISIONS})
    summary["wall_s"] = time.perf_counter() - t0
    rows = [(f"{p} {k}", f"{v:.4g}") for p, s in summary["runs"].items() for k, v in s.items()]
    rows += [("total wall time", f"{summary['wall_s']:.0f}s"), ("report", str(Path(root) / "report.md"))]
    console.print(summary_table("demo: fp16 vs bf16", rows))
    return 0


def _final(rows: list[dict], key: str, last: int = 5) -> float:
    vals = [float(r[key]) for r in rows[-last:] if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def write_demo_report(root: Path, run_dirs: dict[str, Path]) -> dict:
    """report.md + report.json + training_curves.png comparing the runs' metrics.jsonl."""
    from matplotlib.figure import Figure

    data = {p: read_jsonl(d / "metrics.jsonl") for p, d in run_dirs.items()}
    runs = {}
    for p, rows in data.items():
        runs[p] = {
            "steps": float(len(rows)),
            "final_accuracy (mean of last 5 steps)": _final(rows, "reward/accuracy"),
            "peak_accuracy": max((float(r["reward/accuracy"]) for r in rows), default=float("nan")),
            "mean_kl_k3": _final(rows, "mismatch/kl_k3", last=len(rows) or 1),
            "max_abs_logratio": max((float(r["mismatch/abs_logratio_max"]) for r in rows), default=float("nan")),
            "overflow_skips": float(rows[-1].get("train/overflow_skips", 0)) if rows else 0.0,
            "wall_s": sum(float(r.get("time/step_s", 0)) for r in rows),
        }
    fig = Figure(figsize=(11, 4))
    ax_acc, ax_kl = fig.subplots(1, 2)
    for p, rows in data.items():
        steps = [r["step"] for r in rows]
        ax_acc.plot(steps, [r["reward/accuracy"] for r in rows], label=p)
        ax_kl.plot(steps, [r["mismatch/kl_k3"] for r in rows], label=p)
    ax_acc.set(xlabel="RL step", ylabel="training accuracy", title="sanity task accuracy", ylim=(0, 1.02))
    ax_kl.set(xlabel="RL step", ylabel="KL(µ‖π) k3", title="training-inference mismatch", yscale="log")
    for ax in (ax_acc, ax_kl):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "training_curves.png", lambda f: fig.savefig(f, format="png", dpi=110))
    summary = {"runs": runs}
    if {"fp16", "bf16"} <= runs.keys() and runs["fp16"]["mean_kl_k3"] > 0:
        summary["kl_k3_bf16_over_fp16"] = runs["bf16"]["mean_kl_k3"] / runs["fp16"]["mean_kl_k3"]
    atomic_write(root / "report.json", json.dumps(summary, indent=2))
    lines = ["# Sanity demo: FP16 vs BF16", "", "Same recipe, seed, warm start and step budget; only the precision differs.",
             "", "| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for key in next(iter(runs.values())):
        lines.append(f"| {key} | " + " | ".join(f"{runs[p][key]:.4g}" for p in runs) + " |")
    if "kl_k3_bf16_over_fp16" in summary:
        lines += ["", f"Mean KL(µ‖π) over the run, bf16 / fp16: **{summary['kl_k3_bf16_over_fp16']:.1f}x**."]
    lines += ["", "![training curves](training_curves.png)", ""]
    atomic_write(root / "report.md", "\n".join(lines))
    return summary

