"""`nemo-rl-fp16 doctor`: run the mismatch doctor (:mod:`nemo_rl_fp16.doctor`) and write its report.

Files under `<output_dir>/doctor/`: `report.json` (written last: its presence means the report is
complete), `report.md`, `divergence_vs_layer.png`, `config.yaml`. How to read them: docs/doctor.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.assembly import offline_setup
from nemo_rl_fp16.config import ConfigError, save_resolved, typed
from nemo_rl_fp16.doctor import UNIT_ROUNDOFF, replay
from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.report import json_safe

PLOT = "divergence_vs_layer.png"


def parse_precisions(value: str | None, default: Sequence[str]) -> list[str]:
    """The precisions to compare, fp32 (the floor) first, duplicates dropped.

    Args:
        value: comma-separated preset names (e.g. "fp16,bf16"), or None for `default`.
        default: the names used when `value` is None.

    Returns:
        Preset names, `"fp32"` first.

    Raises:
        ConfigError: an unknown name (one line naming the value, the allowed ones and an example).
    """
    names = [v.strip() for v in value.split(",")] if value else list(default)
    bad = [n for n in names if n not in UNIT_ROUNDOFF]
    if bad or not names:
        raise ConfigError(f"bad value for 'precision': {value!r}; allowed: a comma-separated list of "
                          f"{', '.join(UNIT_ROUNDOFF)} (e.g. precision=fp16,bf16; fp32 is always added as the floor)")
    return list(dict.fromkeys(["fp32", *names]))


def _check_backends(rc: Any) -> None:
    if rc.policy.backend != "torch":
        raise ConfigError(f"doctor: policy.backend={rc.policy.backend} is not supported yet (the doctor hooks the torch "
                          "trainer's HF model); run it with policy.backend=torch on the same model")
    if rc.rollout.backend != "torch":
        raise ConfigError(f"doctor: rollout.backend={rc.rollout.backend} is not supported yet (vLLM's decode path "
                          "cannot be hooked layer by layer here); run it with rollout.backend=torch")


def run_doctor(cfg: DictConfig, precisions: Sequence[str] | None = None, console: Console | None = None) -> dict:
    """Sample once, replay per precision through both paths, write the report.

    Samples `mismatch.num_prompts` prompts x `rollout.num_generations` with the recipe's torch
    rollout engine in the first precision (fp32) and sampling settings, from the run's initial
    weights; then, per precision, builds a fresh rollout engine and a `TorchPolicy` (LoRA off) and
    runs `doctor.replay`. Files are written under `<output_dir>/doctor/` (see module docstring).

    Args:
        cfg: the loaded recipe (`config.load_recipe`).
        precisions: preset names to compare, fp32 first (as `parse_precisions` returns them);
            None: `mismatch.precisions` of the recipe, with fp32 added first.
        console: where progress lines go (default: a new rich `Console`).

    Returns:
        The report dict also written as report.json: {"title", "recipe", "samples", "precisions":
        {name: `doctor.compare` result + "logp_gap", "kl_k3", "abs_logratio_mean", "wall_s"},
        "numerics", "files", "wall_s"}.

    Raises:
        ConfigError: `policy.backend` or `rollout.backend` is not "torch" (the doctor hooks the HF
            model of both torch engines), or the recipe does not validate.
    """
    from nemo_rl_fp16.mismatch import mismatch_metrics
    from nemo_rl_fp16.policy import build_policy
    from nemo_rl_fp16.precision import PrecisionPolicy
    from nemo_rl_fp16.precision.cpu_numerics import numerics_record
    from nemo_rl_fp16.rollout import build_rollout_engine
    from nemo_rl_fp16.runtime import torch_threads

    console = console or Console()
    rc = typed(cfg)
    _check_backends(rc)
    precisions = list(precisions or parse_precisions(None, rc.mismatch.precisions))
    out = Path(rc.output_dir) / "doctor"
    t0 = time.perf_counter()
    setup = offline_setup(rc, console)
    device, tokenizer, prompts, init, model_cfg, params = (
        setup.device, setup.tokenizer, setup.prompts, setup.init, setup.model_cfg, setup.params)
    save_resolved(cfg, out)
    results: dict[str, Any] = {}
    with torch_threads(1):  # the tiny model is overhead-bound (commands.demo.run_demo)
        sampler = build_rollout_engine(rc, PrecisionPolicy.from_name(precisions[0]), model_cfg, tokenizer, device,
                                       initial_state_dict=init, model_dir=out / "rollout_model")
        batch = sampler.generate(prompts, params)
        del sampler
        for name in precisions:
            t1 = time.perf_counter()
            pol = PrecisionPolicy.from_name(name)
            engine = build_rollout_engine(rc, pol, model_cfg, tokenizer, device, initial_state_dict=init,
                                          model_dir=out / "rollout_model")
            trainer = build_policy(rc.model_copy(update={"policy": rc.policy.model_copy(
                update={"lora": rc.policy.lora.model_copy(update={"enabled": False})})}), model_cfg, pol, device, init)
            r = replay(engine, trainer, batch, name, rc.rollout.temperature)
            logp = r.pop("logp")
            m = mismatch_metrics(logp["onepass"], logp["decode"], batch.response_mask)
            r["kl_k3"], r["abs_logratio_mean"] = m["mismatch/kl_k3"], m["mismatch/abs_logratio_mean"]
            r["wall_s"] = time.perf_counter() - t1
            results[name] = r
            console.print(f"{name}: first flagged {r['first_flagged'] or 'none'}; |Δlogp| mean "
                          f"{r['logp_gap']['mean']:.2e} ({r['wall_s']:.1f}s)")
    report = {
        "title": f"Mismatch doctor: {rc.recipe}",
        "recipe": rc.recipe,
        "samples": {"rows": batch.num_samples, "tokens": int(batch.response_mask.sum()), "sampled_in": precisions[0],
                    "prompt_width": batch.prompt_width, "response_width": int(batch.response_mask.shape[1])},
        "precisions": results,
        "numerics": numerics_record(device),
        "files": {"markdown": "report.md", "plot": PLOT},
        "wall_s": time.perf_counter() - t0,
    }
    write_doctor_report(out, report)
    console.print(f"report: {out / 'report.md'}")
    return report


def _u(x: float) -> str:
    return "non-finite" if not math.isfinite(x) else f"{x:.2f}"


def write_doctor_report(out: Path, report: dict) -> None:
    """`report.md`, the plot, then `report.json` (last: its presence marks a complete report).

    Each file is written atomically (`fsutil.atomic_write`).

    Args:
        out: the report folder (`<output_dir>/doctor`); created if missing.
        report: the dict `run_doctor` builds; non-finite floats are written as JSON-safe values
            (`report.json_safe`).
    """
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PLOT, lambda f: _plot(f, report))
    atomic_write(out / "report.md", _markdown(report))
    atomic_write(out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


def _markdown(report: dict) -> str:
    runs, s = report["precisions"], report["samples"]
    lines = [f"# {report['title']}", "",
             f"{s['rows']} responses ({s['tokens']} tokens) sampled once in {s['sampled_in']}, then replayed per "
             "precision through the rollout engine's path (prefill + KV-cached decode, decode kernels) and the "
             "trainer's path (one full-sequence forward). Divergence = ‖decode − one-pass‖ / ‖one-pass‖ over the "
             "response tokens, in units of the precision's unit roundoff u; a point is flagged above its noise level. "
             "How to read this: docs/doctor.md.", "",
             "| precision | u | noise level | first flagged | fastest growth (block, +u) | \\|Δlogp\\| mean | "
             "\\|Δlogp\\| max | KL(µ‖π) k3 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        g = r["fastest_growth"]
        grow = f"{g['name']} (+{_u(g['by_u'])} u)" if g else "n/a"
        lines.append(f"| {name} | 2^{round(math.log2(r['u']))} | {r['noise_u']:.3g} u | {r['first_flagged'] or 'none'} "
                     f"| {grow} | {r['logp_gap']['mean']:.2e} | {r['logp_gap']['max']:.2e} | {r['kl_k3']:.2e} |")
    names = list(runs)
    lines += ["", "## Per layer: relative-norm divergence in u (relative max in u) · correlation with |Δlogp| per token",
              "", "| probe point | what | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, row in enumerate(next(iter(runs.values()))["layers"]):
        cells = []
        for name in names:
            layer = runs[name]["layers"][i]
            corr = "" if layer["corr_logp_gap"] is None else f" · r={layer['corr_logp_gap']:.2f}"
            flag = " **⚑**" if layer["flagged"] else ""
            cells.append(f"{_u(layer['rel_norm_u'])} ({_u(layer['rel_max_u'])}){corr}{flag}")
        lines.append(f"| `{row['name']}` | {row['what']} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time: {report['wall_s']:.1f}s. Numerics: "
              + ", ".join(f"{k} `{v}`" for k, v in report["numerics"].items()), "", f"![divergence vs layer]({PLOT})"]
    return "\n".join(lines) + "\n"


def _plot(f: Any, report: dict) -> None:
    from matplotlib.figure import Figure

    runs = report["precisions"]
    labels = [row["name"] for row in next(iter(runs.values()))["layers"]]
    fig = Figure(figsize=(max(6.0, 0.45 * len(labels)), 4.5))
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.38, top=0.9)
    ax = fig.add_subplot()
    finite = [row["rel_norm"] for r in runs.values() for row in r["layers"] if 0 < row["rel_norm"] < math.inf]
    floor = min(finite, default=1e-12) / 10  # exact zeros (bitwise equal) sit a decade below the rest
    for name, r in runs.items():
        ys = [row["rel_norm"] if math.isfinite(row["rel_norm"]) else float("nan") for row in r["layers"]]
        line, = ax.plot(range(len(ys)), [max(y, floor) for y in ys], marker="o",
                        label=f"{name} (u = 2^{round(math.log2(r['u']))})")
        ax.axhline(r["noise_u"] * r["u"], color=line.get_color(), ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖decode − one-pass‖ / ‖one-pass‖\n(bottom: bitwise equal)", fontsize=8)
    ax.set_title(f"{report['title']} (dotted: each precision's noise level)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(f, format="png", dpi=110)
