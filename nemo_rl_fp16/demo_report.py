"""The demo's side-by-side report: in-run π-vs-µ mismatch and accuracy per precision.

Reads each run's `metrics.jsonl` (one row per RL step, names in docs/metrics.md) and writes
`report.json`, `report.md` and `training_curves.png` under the demo folder. Every figure is pooled
over the whole run, so one spiky step cannot make the headline:

- `kl_k3_pooled`: token-weighted KL(µ‖π) over the run, Σ_steps kl_k3·n_tokens / Σ n_tokens;
- `kl_k3_median_step`, `frac_steps_kl_zero`: the per-step distribution (a host whose kernels make
  π and µ bitwise equal shows up here, not as a small mean);
- `kl_by_length_pooled/<bucket>`: the same pooling per response-length bucket;
- `seq_logratio_std_mean`, `is_ratio_std_mean`, `is_ratio_max`, `mis_masked_frac`: the spread of
  the importance ratios the algorithms see;
- `final_accuracy` (mean of the last 5 steps), `peak_accuracy`, and `eval/*` when evaluated.

The headline `kl_k3_pooled_bf16_over_fp16` comes with the spread of the per-step ratio (10th,
50th, 90th percentile over the steps where both KLs are positive). Plots use symlog axes with a
marked floor, so steps with KL exactly 0 are visible.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.loggers import read_jsonl
from nemo_rl_fp16.report import json_safe, ratio_text, symlog_floor

KL = "mismatch/kl_k3"


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if key in r], dtype=np.float64)


def _pooled(rows: list[dict], value: str, weight: str) -> float | None:
    pairs = [(float(r[value]), float(r[weight])) for r in rows if value in r and weight in r]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def run_summary(rows: list[dict]) -> dict[str, Any]:
    """The per-precision figures of the module doc from one run's metric rows.

    Args:
        rows (list[dict]): the run's metrics.jsonl rows, one per step, in step order.

    Returns:
        dict[str, Any]: steps, pooled and median per-step `mismatch/kl_k3`, the fraction of steps
            with KL 0, IS-ratio and log-ratio spreads, MIS-masked fraction, mean response length, final
            (last 5 steps) and peak accuracy, overflow skips, wall time (s), KL pooled per response-length
            bucket, and the last `eval/*` row when the run evaluated.

    Raises:
        ValueError: `rows` is empty.
    """
    if not rows:
        raise ValueError("run_summary: the run logged no step (empty metrics.jsonl)")
    kl = _col(rows, KL)
    acc = _col(rows, "reward/accuracy")
    out: dict[str, Any] = {
        "steps": len(rows),
        "kl_k3_pooled": _pooled(rows, KL, "mismatch/n_tokens"),
        "kl_k3_median_step": float(np.median(kl)) if kl.size else None,
        "frac_steps_kl_zero": float((kl == 0).mean()) if kl.size else None,
        "seq_logratio_std_mean": float(_col(rows, "mismatch/seq_logratio_std").mean()),
        "is_ratio_std_mean": float(_col(rows, "mismatch/is_ratio_std").mean()),
        "is_ratio_max": float(_col(rows, "mismatch/is_ratio_max").max()),
        # a fraction of sequences, and every step samples the same number of them: a plain mean
        "mis_masked_frac": float(_col(rows, "mismatch/mis_masked_frac").mean()),
        "response_length_mean": float(_col(rows, "response/length_mean").mean()),
        "final_accuracy": float(acc[-5:].mean()),
        "peak_accuracy": float(acc.max()),
        "overflow_skips": float(rows[-1].get("train/overflow_skips", 0.0)),
        "wall_s": float(_col(rows, "time/step_s").sum()),
    }
    buckets = sorted({k.split("/", 2)[2] for r in rows for k in r if k.startswith("mismatch/kl_by_length/")},
                     key=lambda b: int(b.split("-")[0]))
    out["kl_by_length_pooled"] = {
        b: _pooled(rows, f"mismatch/kl_by_length/{b}", f"mismatch/tokens_by_length/{b}") for b in buckets}
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        out["eval"] = {k: float(v) for k, v in evals[-1].items() if k.startswith("eval/")}
    return out


def _step_ratio_spread(a: list[dict], b: list[dict]) -> dict[str, float] | None:
    """Percentiles of per-step KL(b)/KL(a) over steps where both are positive."""
    ka, kb = {r["step"]: r.get(KL, 0.0) for r in a}, {r["step"]: r.get(KL, 0.0) for r in b}
    ratios = np.array([kb[s] / ka[s] for s in ka if s in kb and ka[s] > 0 and kb[s] > 0])
    if not ratios.size:
        return None
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    return {"p10": float(p10), "median": float(p50), "p90": float(p90), "steps": int(ratios.size)}


def write_demo_report(root: Path, run_dirs: Mapping[str, Path], numerics: Mapping[str, Any] | None = None,
                      extra: Mapping[str, Any] | None = None) -> dict:
    """Write report.json / report.md / training_curves.png under `root` and return the JSON.

    Args:
        root: the demo folder.
        run_dirs: run label (e.g. "fp16", "bf16", "pg_seq_is fp16") -> run folder with metrics.jsonl.
        numerics: `cpu_numerics.numerics_record` of the host the runs used.
        extra: more top-level JSON fields (e.g. wall time).

    Returns:
        dict: the report's JSON (`runs`, `numerics`, the bf16/fp16 KL ratios when both ran, `extra`).

    Raises:
        ValueError: a run folder without metric rows.
    """
    data = {p: read_jsonl(Path(d) / "metrics.jsonl") for p, d in run_dirs.items()}
    runs = {p: run_summary(rows) for p, rows in data.items()}
    summary: dict[str, Any] = {"runs": runs, "numerics": dict(numerics or {}), **dict(extra or {})}
    if {"fp16", "bf16"} <= runs.keys():
        f16, b16 = runs["fp16"]["kl_k3_pooled"], runs["bf16"]["kl_k3_pooled"]
        summary["kl_k3_pooled_bf16_over_fp16"] = b16 / f16 if f16 else None
        summary["kl_k3_step_ratio_bf16_over_fp16"] = _step_ratio_spread(data["fp16"], data["bf16"])
    root.mkdir(parents=True, exist_ok=True)
    _plot(root / "training_curves.png", data, runs)
    atomic_write(root / "report.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
    atomic_write(root / "report.md", _markdown(summary))
    return summary


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(summary: dict) -> str:
    runs = summary["runs"]
    names = list(runs)
    lines = ["# Demo: FP16 vs BF16, π (trainer) vs µ (rollout engine)", "",
             "Same recipe, seed, warm start and step budget; only the precision differs.", ""]
    if summary.get("kl_k3_pooled_bf16_over_fp16") is not None:
        spread = summary.get("kl_k3_step_ratio_bf16_over_fp16") or {}
        headline = ratio_text(summary["kl_k3_pooled_bf16_over_fp16"], "bf16").replace("**", "")
        lines.append(f"**Pooled KL(µ‖π), bf16 vs fp16: {headline}**"
                     + (f" (per-step ratio: median {spread['median']:.3g}x, 10th-90th percentile "
                        f"{spread['p10']:.3g}x-{spread['p90']:.3g}x over {spread['steps']} steps)" if spread else ""))
        lines.append("")
    scalar = [k for k, v in runs[names[0]].items() if not isinstance(v, dict)]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {k} | " + " | ".join(_fmt(runs[n].get(k)) for n in names) + " |" for k in scalar]
    buckets = sorted({b for n in names for b in runs[n]["kl_by_length_pooled"]}, key=lambda b: int(b.split("-")[0]))
    lines += [f"| kl_k3 pooled, length {b} | " + " | ".join(_fmt(runs[n]["kl_by_length_pooled"].get(b)) for n in names)
              + " |" for b in buckets]
    evals = sorted({k for n in names for k in runs[n].get("eval", {})})
    lines += [f"| {k} | " + " | ".join(_fmt(runs[n].get("eval", {}).get(k)) for n in names) + " |" for k in evals]
    if summary.get("numerics"):
        lines += ["", "Numerics: " + ", ".join(f"{k} `{v}`" for k, v in summary["numerics"].items())]
    lines += ["", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def _plot(path: Path, data: dict[str, list[dict]], runs: dict[str, dict]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    ax_acc, ax_kl, ax_len = fig.subplots(1, 3)
    every: list[float] = []
    for p, rows in data.items():
        steps = [r["step"] for r in rows]
        ax_acc.plot(steps, [r["reward/accuracy"] for r in rows], label=p)
        kl = [r.get(KL, 0.0) for r in rows]
        every += kl
        ax_kl.plot(steps, kl, label=p, marker=".", markersize=3, linewidth=0.8)
        pooled = runs[p]["kl_by_length_pooled"]
        ax_len.plot(list(pooled), [0.0 if v is None else v for v in pooled.values()], marker="o", label=p)
    by_len = [v for r in runs.values() for v in r["kl_by_length_pooled"].values() if v is not None]
    ax_acc.set(xlabel="RL step", ylabel="training accuracy", title="accuracy", ylim=(0, 1.02))
    for ax, vals in ((ax_kl, every), (ax_len, by_len)):  # symlog: exact zeros stay visible
        floor = symlog_floor(vals)
        ax.set_yscale("symlog", linthresh=floor)
        ax.axhline(floor, color="gray", linewidth=0.6, linestyle=":", label="symlog floor (below: 0)")
    ax_kl.set(xlabel="RL step", ylabel="KL(µ‖π) k3 (symlog)", title="training-inference mismatch per step")
    ax_len.set(xlabel="response length (tokens)", ylabel="pooled KL(µ‖π) k3 (symlog)", title="mismatch by length")
    ax_len.tick_params(axis="x", labelrotation=45)
    for ax in (ax_acc, ax_kl, ax_len):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
